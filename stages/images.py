"""Image files -> raw ``uint8`` arrays: the one decoder that prepare (``dataset: images``) and predict share.

``decode`` turns one file into a ``(channels, height, width)`` ``uint8`` array: opened with Pillow,
fully decoded (a truncated file fails here, not later), turned upright by its EXIF orientation (as
image viewers show it), converted to grayscale (``channels: 1``) or RGB (``channels: 3``), and
resized to ``(height, width)`` with Pillow's antialiased bilinear filter, stretching it (no crop). The
rules are strict where a silent conversion would lose information: a color image where grayscale is
asked for is refused (an RGB file whose three channels are equal is grayscale and passes), as are
16-bit and float pixels; a grayscale image where RGB is asked for is replicated to three channels;
an alpha channel is dropped (the color channels are kept as stored).

``decode_many`` decodes a list of files (in a pool of processes where that pays: ``auto_workers``),
with a progress bar on a terminal, and reports every bad file at once in one ``StageError`` naming
the files and the fix. ``read_folder`` reads ``root/<class name>/**/*.png|jpg|jpeg|bmp|webp``, or
``root/{train,val,test}/<class name>/...``, into arrays and labels (class names sorted).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from stages.common import StageError

log = logging.getLogger(__name__)

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")  # compared lower-cased
SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
MAX_SIDE = 4096  # pixels: a recipe size beyond this is a typo, not a dataset
# Files per task of the pool: large enough that a task's overhead (pickling, a queue round trip) is
# small against ~0.15 ms per small PNG, small enough that the progress bar moves.
CHUNK = 256
# Automatic workers: a pool of processes only when decoding the rest serially would take longer than
# this and at least two cores are idle. Measured on the 2-core machine (benchmarks/image_decode.py,
# docs in the README): 10,000 PNGs of 28x28 decode in ~1.4 s serially, and a pool (forkserver start,
# ~0.5-1 s) never paid there, for small PNGs, 256x256 JPEGs or 512x512 PNGs, with the other core busy.
MIN_PARALLEL_SECONDS = 10.0
MAX_WORKERS = 8
PROGRESS_MIN = 200  # files (or samples): fewer finish before a bar would be read

# What a bad file's kind asks of the user, unless the caller words it for its own context.
FIXES = {
    "unreadable": "replace or delete the file(s)",
    "color": "convert them to grayscale, or read color images (prepare.images.channels: 3)",
    "depth": "convert them to 8 bits per channel",
    "size": "set prepare.images.size: [height, width] to resize every image to one size",
}


class ImageProblem(StageError):
    """One file that cannot be used, and why; ``kind`` picks the fix (``FIXES``)."""

    def __init__(self, path: Path | str, kind: str, why: str):
        super().__init__(f"{path}: {why}; {FIXES[kind]}")
        self.path, self.kind, self.why = str(path), kind, why


def is_image(path: Path | str) -> bool:
    """By extension, as the folder reader and predict choose files."""
    return Path(path).suffix.lower() in EXTENSIONS


# ---------------------------------------------------------------- one file

def decode(path: Path | str, size: Sequence[int] | None, channels: int, *, resize: bool = True) -> np.ndarray:
    """One image file -> ``uint8`` array ``(channels, height, width)``.

    ``size``: ``(height, width)`` to resize to; None keeps the file's size. ``resize=False`` refuses a
    file of another size instead of resizing it (an ``ImageProblem`` of kind ``size``)."""
    from PIL import Image, ImageOps

    path = Path(path)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    try:
        with Image.open(path) as opened:
            if size and opened.format == "JPEG":
                # JPEG can decode at 1/2, 1/4 or 1/8 scale directly from its DCT coefficients: 512x512
                # JPEGs bound for 64x64 took 0.96 ms each instead of 7.7 ms here. draft keeps at least the
                # requested size (the larger side on both axes, as EXIF may rotate the image); the resize
                # below does the rest.
                side = max(size)
                opened.draft(opened.mode, (side, side))
            opened.load()  # decode now: a truncated or corrupt file fails here, naming itself
            img = opened
            if img.getexif().get(0x0112, 1) != 1:  # EXIF orientation: turn the image upright
                img = ImageOps.exif_transpose(img)
            img = _eight_bit(img, path)
            if size and img.size != (int(size[1]), int(size[0])):
                if not resize:
                    raise ImageProblem(path, "size", f"{img.size[1]}x{img.size[0]} (height x width) where the "
                                                     f"other images are {size[0]}x{size[1]}")
                img = img.resize((int(size[1]), int(size[0])), Image.Resampling.BILINEAR)
            a = np.asarray(img, dtype=np.uint8)  # inside the with: a closed file's image is gone
    except ImageProblem:
        raise
    except Image.DecompressionBombError as e:
        raise ImageProblem(path, "unreadable", f"too large to decode safely ({e})") from None
    except FileNotFoundError:
        raise ImageProblem(path, "unreadable", "no such file") from None
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, ... for damaged files
        raise ImageProblem(path, "unreadable", _why_unreadable(e)) from None
    if a.ndim == 2:  # L
        return a[None] if channels == 1 else np.repeat(a[None], 3, axis=0)
    if channels == 3:  # RGB
        return np.ascontiguousarray(a.transpose(2, 0, 1))
    if not ((a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()):
        raise ImageProblem(path, "color", "a color image where grayscale (1 channel) is expected")
    return np.ascontiguousarray(a[None, :, :, 0])


def _eight_bit(img, path: Path):
    """The decoded image as mode L (grayscale) or RGB, 8 bits per channel."""
    mode = img.mode
    if mode in ("L", "RGB"):
        return img
    if mode in ("1", "LA", "La"):
        return img.convert("L")
    if mode.startswith("I") or mode == "F":
        bits = "16-bit" if "16" in mode else "32-bit integer" if mode.startswith("I") else "floating-point"
        raise ImageProblem(path, "depth", f"{bits} pixels (Pillow mode {mode}); 8 bits per channel are read")
    with warnings.catch_warnings():  # "Palette images with Transparency ... should be converted to RGBA"
        warnings.simplefilter("ignore")
        # RGBA, CMYK, YCbCr, LAB, HSV, P (a gray palette passes decode's equal-channels check): to RGB,
        # alpha dropped
        return img.convert("RGB")


def _why_unreadable(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "truncated" in text or isinstance(e, EOFError):
        return f"truncated or damaged ({text})"
    if "cannot identify image file" in text:
        return "not an image, or a format Pillow cannot read, despite its extension"
    return f"cannot be decoded ({type(e).__name__}: {text[:200]})"


# ---------------------------------------------------------------- many files

def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def auto_workers(serial_seconds: float) -> int:
    """Processes for work that would take ``serial_seconds`` here: 1 (this process) when that is short
    or fewer than two cores are idle (usable cores minus the 1-minute load average), else the idle
    cores, at most ``MAX_WORKERS``."""
    idle = usable_cores() - (os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0)
    if serial_seconds < MIN_PARALLEL_SECONDS or idle < 2:
        return 1
    return int(min(idle, MAX_WORKERS))


def _decode_chunk(paths: Sequence[str], size, channels: int, resize: bool) -> list:
    """A pool task: each file's array, or its problem as (path, kind, why) (exceptions cross processes
    badly)."""
    out = []
    for p in paths:
        try:
            out.append(decode(p, size, channels, resize=resize))
        except ImageProblem as e:
            out.append((e.path, e.kind, e.why))
    return out


def decode_many(paths: Sequence[Path | str], size: Sequence[int] | None, channels: int, *, resize: bool = True,
                workers: int = 0, pool: str = "process", fixes: Mapping[str, str] | None = None,
                what: str = "decoding images") -> list[np.ndarray]:
    """Every file decoded (``decode``), in order. ``workers``: 1 decodes in this process, N > 1 in a
    pool of N (``pool``: ``process`` or ``thread``), 0 decides after the first ``CHUNK`` files from
    their measured cost (``auto_workers``). Every bad file is reported at once in one StageError (up to
    five named, with why, then a count), with the fix for each kind (``fixes`` overrides ``FIXES``)."""
    results = decode_each(paths, size, channels, resize=resize, workers=workers, pool=pool, what=what)
    problems = [r for r in results if isinstance(r, tuple)]
    if problems:
        raise StageError(_problems_message(problems, len(results), {**FIXES, **(fixes or {})}))
    return results


def decode_each(paths: Sequence[Path | str], size: Sequence[int] | None, channels: int, *, resize: bool = True,
                workers: int = 0, pool: str = "process", what: str = "decoding images") -> list:
    """``decode_many`` without the verdict: per file its array, or ``(path, kind, why)`` when it cannot
    be used."""
    paths = [str(p) for p in paths]
    chunks = [paths[i:i + CHUNK] for i in range(0, len(paths), CHUNK)]
    results: list = []
    with progress(len(paths), what) as advance:
        n_workers = workers
        if workers == 0 and chunks:
            started = time.perf_counter()
            results += _decode_chunk(chunks[0], size, channels, resize)
            advance(len(chunks[0]))
            per_file = (time.perf_counter() - started) / len(chunks[0])
            chunks = chunks[1:]
            n_workers = auto_workers(per_file * sum(map(len, chunks)))
            log.debug("decoding %d images: %.3f ms each -> %d worker(s)", len(paths), per_file * 1e3, n_workers)
        if n_workers <= 1 or len(chunks) <= 1:
            for chunk in chunks:
                results += _decode_chunk(chunk, size, channels, resize)
                advance(len(chunk))
        else:
            with _executor(pool, n_workers) as ex:
                futures = [ex.submit(_decode_chunk, chunk, size, channels, resize) for chunk in chunks]
                for future in futures:  # in order; the bar moves as the head of the queue finishes
                    part = future.result()
                    results += part
                    advance(len(part))
    return results


def _executor(pool: str, n: int):
    if pool == "thread":
        return ThreadPoolExecutor(n)
    import multiprocessing

    # forkserver, not fork: the pipeline process may hold torch and its thread pools, which a forked
    # child inherits in an undefined state; a forkserver child imports only what a task needs.
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    return ProcessPoolExecutor(n, mp_context=multiprocessing.get_context(method))


def _problems_message(problems: list[tuple[str, str, str]], total: int, fixes: Mapping[str, str]) -> str:
    if len(problems) == 1:
        path, kind, why = problems[0]
        return f"{path}: {why}; {fixes[kind]}"
    named = "; ".join(f"{path}: {why}" for path, _, why in problems[:5])
    more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
    kinds = list(dict.fromkeys(kind for _, kind, _ in problems))
    return f"{len(problems)} of {total} image files cannot be used: {named}{more}. Fix: " + "; ".join(
        fixes[k] for k in kinds)


@contextlib.contextmanager
def progress(total: int, description: str) -> Iterator[Callable[[int], None]]:
    """``advance(n)`` for a progress bar on stderr, shown only on a terminal and for ``PROGRESS_MIN``
    items or more (logs, pipes and --json output stay clean)."""
    if total < PROGRESS_MIN or not sys.stderr.isatty():
        yield lambda n=1: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


# ---------------------------------------------------------------- a folder of class folders

def list_images(folder: Path) -> tuple[list[Path], list[Path]]:
    """(image files, other files) under ``folder``, recursively, sorted; hidden files and folders
    (``.DS_Store``, ``.ipynb_checkpoints``) are skipped."""
    images, others = [], []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                (images if is_image(name) else others).append(Path(dirpath) / name)
    return images, others


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


@dataclass
class Folder:
    """A folder of class folders, read: ``splits`` maps train (and val / test where the folder has
    them) to ``(x uint8 (N, C, H, W), y int64 (N,))``."""

    root: Path
    classes: list[str]
    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    layout: str  # "folders" (train/ val/ test/ given) or "classes" (one pool, split by prepare)
    files: dict[str, list[Path]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def scan(root: Path) -> tuple[str, dict[str, dict[str, list[Path]]], list[str]]:
    """-> (layout, {split: {class: files}}, notes) without decoding anything; StageError for a folder
    that cannot be a dataset (missing, no images, images outside class folders, an empty class, one class)."""
    root = Path(root)
    if not root.is_dir():
        raise StageError(f"{root}: no such directory; set prepare.path to a folder holding one subfolder of "
                         "images per class (root/<class name>/*.png)")
    top = _subfolders(root)
    names = {p.name.lower() for p in top}
    notes: list[str] = []
    if "train" in names:
        layout = "folders"
        strays = [p.name for p in top if p.name.lower() not in SPLIT_FOLDERS]
        if strays:
            raise StageError(f"{root}: holds a train/ folder and also {strays}; with separate split folders every "
                             "subfolder must be train/, val/ (or valid/, validation/) or test/, each holding the class "
                             "folders: move the others into them")
        split_dirs: dict[str, Path] = {}
        for p in top:
            split = SPLIT_FOLDERS[p.name.lower()]
            if split in split_dirs:
                raise StageError(f"{root}: both {split_dirs[split].name}/ and {p.name}/ are a {split} split; keep one")
            split_dirs[split] = p
    else:
        layout = "classes"
        split_dirs = {"train": root}
    loose = _loose_images(root, layout, split_dirs)
    if loose:
        raise StageError(f"{loose[0].parent}: {len(loose)} image file(s) (e.g. {loose[0].name}) outside any class "
                         f"folder; images go in one subfolder per class: {loose[0].parent}/<class name>/{loose[0].name}")
    found: dict[str, dict[str, list[Path]]] = {}
    ignored = 0
    for split, folder in split_dirs.items():
        classes: dict[str, list[Path]] = {}
        for class_dir in _subfolders(folder):
            files, others = list_images(class_dir)
            ignored += len(others)
            if not files:
                extra = f" ({len(others)} other files, e.g. {others[0].name}, are not read)" if others else ""
                raise StageError(f"{class_dir}: a class folder with no images{extra}; add "
                                 f"{'/'.join(e[1:] for e in EXTENSIONS)} images to it or remove it")
            classes[class_dir.name] = files
        found[split] = classes
    if ignored:
        notes.append(f"{ignored} files without an image extension ({', '.join(EXTENSIONS)}) were not read")
    for split, classes in found.items():
        if not classes:
            where = split_dirs[split]
            raise StageError(f"{where}: no class folders with images; expected {where}/<class name>/*.png "
                             f"(extensions {', '.join(EXTENSIONS)})" + ("" if split == "train" else
                                                                        f", or remove {where.name}/"))
    train = found["train"]
    if len(train) == 1:
        only = next(iter(train))
        raise StageError(f"{split_dirs['train']}: a single class folder ({only}/); classification needs at least two: "
                         "add one folder of images per class")
    for split, classes in found.items():
        unknown = sorted(set(classes) - set(train))
        if unknown:
            raise StageError(f"{split_dirs[split]}: class folder(s) {unknown} are not in {split_dirs['train']}; every "
                             "class needs training images: add them to train/ or remove the folder(s)")
        missing = sorted(set(train) - set(classes))
        if split != "train" and missing:
            notes.append(f"{split}/ has no images of {missing}")
    return layout, found, notes


def _loose_images(root: Path, layout: str, split_dirs: Mapping[str, Path]) -> list[Path]:
    """Image files directly in root (or directly in a split folder), where only class folders belong."""
    loose = []
    for folder in ([root] + list(split_dirs.values()) if layout == "folders" else [root]):
        loose += sorted(p for p in folder.iterdir() if p.is_file() and is_image(p))
    return loose


def read_folder(root: Path | str, size: Sequence[int] | None, channels: int, *, workers: int = 0) -> Folder:
    """Scan and decode ``root`` (see ``scan``); ``size`` ``(height, width)``, or empty/None to keep the
    images' own size, which must then be one size for all."""
    root = Path(root)
    layout, found, notes = scan(root)
    classes = sorted(found["train"])
    index = {name: i for i, name in enumerate(classes)}
    ordered = [(split, cls, f) for split, per_class in found.items() for cls in sorted(per_class)
               for f in per_class[cls]]
    paths = [f for _, _, f in ordered]
    fixed = tuple(size) if size else None
    if fixed is None:  # the first image decides; every other one must match it
        fixed = decode(paths[0], None, channels).shape[1:]
    arrays = decode_many(paths, fixed, channels, resize=bool(size), workers=workers,
                         what=f"decoding {len(paths)} images")
    splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    files: dict[str, list[Path]] = {}
    for split in found:
        rows = [i for i, (s, _, _) in enumerate(ordered) if s == split]
        x = np.stack([arrays[i] for i in rows]) if rows else np.zeros((0, channels, *fixed), np.uint8)
        y = np.array([index[ordered[i][1]] for i in rows], dtype=np.int64)
        splits[split] = (x, y)
        files[split] = [ordered[i][2] for i in rows]
    return Folder(root=root, classes=classes, splits=splits, layout=layout, files=files, notes=notes)
