"""predict: samples in files through one ONNX file, read by nothing but the file's own metadata.

Sources: image files (``.png .jpg .jpeg .bmp .webp``), folders of them (recursively, sorted), ``.npy``
arrays, ``.npz`` archives (the array named like the model's input, or ``key``; one array per input
name for a file with several inputs) and ``.csv`` rows (a header row is skipped). Everything about
the input comes from ``OnnxModel.meta``: its shape, dtype and layout, the raw value range and how raw
samples are normalized (``preprocessing``), the labels. No recipe, no run directory, no MLflow, no
torch: a file from anywhere works from any directory.

Image files are decoded by ``stages.images.decode_many``, the decoder prepare uses for a folder of
images, at the model's channels and height x width (resized when they differ); their pixels 0..255
are then mapped linearly to the raw range the model was trained on when the metadata gives one that
differs (the bundled digits: 0..16). Arrays are taken as raw samples, as data.npz stores them. Every
input problem is one ``StageError`` naming the file and what the model expects: a shape, a feature
count, channels, a dtype, a missing .npz key.

What comes out: for a classifier, the top-k labels (indices where the file has none) with softmax
probabilities of its logits (or its own ``probabilities`` output); for regression, one value per
target; for a VAE, the reconstruction error per sample and, with an output directory, each
reconstruction as a PNG (raw units mapped back to 0..255); for a file whose task is unknown, the
top-k indices of its first output by raw value, or the values themselves.
"""

from __future__ import annotations

import csv
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from stages import images
from stages.common import StageError, atomic_path
from stages.onnx_model import UNKNOWN, ModelMeta, OnnxModel

log = logging.getLogger(__name__)

IMAGE_LAYOUTS = ("NCHW", "NHWC")
ARRAY_SUFFIXES = (".npy", ".npz", ".csv")
KINDS = f"image files ({', '.join(images.EXTENSIONS)}), a folder of them, .npy, .npz or .csv"
# What a bad image asks of the user here (prepare words the same problems for its recipe).
FIXES = {
    "color": "the model takes grayscale (1-channel) images: convert them to grayscale",
    "size": "resize them",  # not raised: predict always resizes to the model's size
}


class PredictFailed(StageError):
    """The inputs were fine but running the model failed (ONNX Runtime's error, with the source)."""


# ---------------------------------------------------------------- what the model takes

@dataclass(frozen=True)
class InputForm:
    """The described input of a model, from its metadata: what a raw sample must look like."""

    name: str
    dtype: str  # what the graph takes
    raw_dtype: str  # what a raw sample is (data.npz's dtype): the graph's when it normalizes inside
    sample_shape: tuple | None  # per-sample dims (no batch axis); ints fixed, str/None free; None: unknown rank
    layout: str | None  # NCHW, NHWC, NCL, NF, ... (metadata input.layout); None: unknown
    raw_range: tuple[float, float] | None  # [lo, hi] of raw samples; None: the metadata does not say
    preprocessing: str  # in-graph | normalize | none

    @classmethod
    def of(cls, meta: ModelMeta) -> "InputForm":
        spec, pre = meta.input, meta.preprocessing
        raw_range = pre.raw_value_range if pre.raw_value_range is not None else (
            spec.value_range if pre.kind != "normalize" else None)
        if not (isinstance(raw_range, (list, tuple)) and len(raw_range) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw_range)):
            raw_range = None
        raw_dtype = pre.raw_dtype if pre.raw_dtype and pre.kind != "none" else (spec.dtype or "float32")
        return cls(name=spec.name, dtype=spec.dtype or "float32", raw_dtype=raw_dtype,
                   sample_shape=tuple(spec.shape[1:]) if spec.shape is not None else None,
                   layout=spec.layout.upper() if spec.layout and spec.layout.lower() != UNKNOWN else None,
                   raw_range=(float(raw_range[0]), float(raw_range[1])) if raw_range else None,
                   preprocessing=pre.kind)

    @property
    def image_axes(self) -> tuple | None:
        """(channels, height, width) for an image input (layout NCHW or NHWC, 1 or 3 channels), else None."""
        if self.layout not in IMAGE_LAYOUTS or self.sample_shape is None or len(self.sample_shape) != 3:
            return None
        c, h, w = self.sample_shape if self.layout == "NCHW" else (self.sample_shape[2], *self.sample_shape[:2])
        return (c, h, w) if c in (1, 3) else None

    @property
    def features(self) -> int | None:
        """Values per sample when every per-sample dim is fixed."""
        if self.sample_shape is None or not all(isinstance(d, int) for d in self.sample_shape):
            return None
        return math.prod(self.sample_shape)

    def describe(self) -> str:
        shape = "[" + ", ".join(str(d) if isinstance(d, int) else "?" for d in self.sample_shape) + "]" \
            if self.sample_shape is not None else "of unknown shape"
        parts = [self.raw_dtype]
        if self.layout:
            parts.append(self.layout)
        if self.raw_range:
            parts.append(f"raw values {_num(self.raw_range[0])}..{_num(self.raw_range[1])}")
        return f"samples shaped {shape} ({', '.join(parts)})"


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


# ---------------------------------------------------------------- reading sources

@dataclass
class Batch:
    """Raw samples from one source (or a run of image files), ready for ``OnnxModel.feed``."""

    source: str
    names: list[str]
    x: np.ndarray | dict[str, np.ndarray]


@dataclass
class Inputs:
    batches: list[Batch]
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return sum(len(b.names) for b in self.batches)


def read(sources: Sequence[str | Path], meta: ModelMeta, *, key: str | None = None, workers: int = 0) -> Inputs:
    """Every source read into raw batches for the model ``meta`` describes; one StageError for the
    first source that does not fit, naming it and what the model expects."""
    if not sources:
        raise StageError(f"nothing to predict: pass {KINDS}")
    if key is not None and not any(str(s).lower().endswith(".npz") for s in sources):
        raise StageError(f"--key {key!r} names an array of an .npz archive, and no source is one")
    form = InputForm.of(meta)
    out = Inputs([])
    image_files: list[tuple[str, Path]] = []  # (shown name, path), read together: one decode pool

    def flush_images() -> None:
        if image_files:
            out.batches += _read_images(image_files, form, meta, workers, out.notes)
            image_files.clear()

    for source in sources:
        path = Path(source)
        if path.is_dir():
            found, others = images.list_images(path)
            if not found:
                extra = f" ({len(others)} other files, e.g. {others[0].name})" if others else ""
                raise StageError(f"{path}: no image files ({', '.join(images.EXTENSIONS)}) in it or below it{extra}; "
                                 f"pass {KINDS}")
            image_files += [(str(f), f) for f in found]
            continue
        if not path.is_file():
            raise StageError(f"{source}: no such file or folder; pass {KINDS}")
        if images.is_image(path):
            image_files.append((str(source), path))
            continue
        flush_images()  # keep the order of the sources
        suffix = path.suffix.lower()
        if suffix not in ARRAY_SUFFIXES:
            raise StageError(f"{source}: a {path.suffix or 'suffix-less'} file, which predict does not read; pass {KINDS}")
        if key is not None and suffix != ".npz":
            raise StageError(f"--key names an array of an .npz archive; {source} is not one")
        if len(meta.inputs) > 1 and suffix != ".npz":
            raise StageError(f"{source}: {meta.where} takes {len(meta.inputs)} inputs {[i.name for i in meta.inputs]}; "
                             "pass an .npz archive holding one array per input name")
        if suffix == ".npy":
            out.batches.append(_read_npy(path, str(source), form, out.notes))
        elif suffix == ".npz":
            out.batches.append(_read_npz(path, str(source), form, meta, key, out.notes))
        else:
            out.batches.append(_read_csv(path, str(source), form, out.notes))
    flush_images()
    return out


def _read_images(files: list[tuple[str, Path]], form: InputForm, meta: ModelMeta, workers: int,
                 notes: list[str]) -> list[Batch]:
    axes = form.image_axes
    first = files[0][0]
    if len(meta.inputs) > 1:
        raise StageError(f"{first}: {meta.where} takes {len(meta.inputs)} inputs {[i.name for i in meta.inputs]}; "
                         "pass an .npz archive holding one array per input name")
    if axes is None:
        why = (f"its metadata does not say its input is an image (input.layout is {form.layout or 'unknown'})"
               if form.layout not in IMAGE_LAYOUTS else "its input has no fixed 1 or 3 channels")
        raise StageError(f"{first}: an image, but {meta.where} takes {form.describe()} and {why}; pass the samples as "
                         ".npy, .npz or .csv arrays instead")
    channels, h, w = axes
    size = (h, w) if isinstance(h, int) and isinstance(w, int) else None
    pixels = images.decode_many([p for _, p in files], size, channels, workers=workers, fixes=FIXES,
                                what=f"decoding {len(files)} images")
    if form.raw_range is None:
        notes.append(f"{meta.where} gives no raw value range: image pixels are fed as they are, 0..255, as "
                     f"{form.raw_dtype}")
    elif form.raw_range != (0.0, 255.0):
        notes.append(f"image pixels 0..255 are mapped to the model's raw range "
                     f"{_num(form.raw_range[0])}..{_num(form.raw_range[1])}")
    # Consecutive same-sized images run together (a fixed-size model: all of them); a model with free
    # height/width takes each run of one size as its own batch, so the rows keep the order of the files.
    runs: list[list[int]] = []
    for i, a in enumerate(pixels):
        if runs and pixels[runs[-1][0]].shape == a.shape:
            runs[-1].append(i)
        else:
            runs.append([i])
    batches = []
    for rows in runs:
        x = _pixels_to_raw(np.stack([pixels[i] for i in rows]), form)
        batches.append(Batch(source=files[rows[0]][0] if len(rows) == 1 else f"{len(rows)} image files",
                             names=[files[i][0] for i in rows], x=x))
    return batches


def _pixels_to_raw(px: np.ndarray, form: InputForm) -> np.ndarray:
    """uint8 (N, C, H, W) pixels -> raw samples in the model's layout, dtype and value range."""
    if form.layout == "NHWC":
        px = np.ascontiguousarray(px.transpose(0, 2, 3, 1))
    if form.raw_range is None or form.raw_range == (0.0, 255.0):
        return px
    lo, hi = form.raw_range
    x = lo + px.astype(np.float32) * np.float32((hi - lo) / 255.0)
    if np.dtype(_np_dtype(form.raw_dtype)).kind in "iu":
        x = np.round(x)
    return x.astype(_np_dtype(form.raw_dtype), copy=False)


def _np_dtype(name: str) -> np.dtype:
    try:
        return np.dtype(name)
    except TypeError:
        return np.dtype(np.float32)


def _read_npy(path: Path, shown: str, form: InputForm, notes: list[str]) -> Batch:
    try:
        x = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise StageError(f"{shown}: not a readable .npy array ({str(e).splitlines()[0][:200]}); save it with "
                         "numpy.save") from None
    x = _check_array(x, form, shown, notes)
    return Batch(source=shown, names=_indexed(shown, len(x)), x=x)


def _read_npz(path: Path, shown: str, form: InputForm, meta: ModelMeta, key: str | None, notes: list[str]) -> Batch:
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise StageError(f"{shown}: not a readable .npz archive ({str(e).splitlines()[0][:200]}); save it with "
                         "numpy.savez") from None
    if len(meta.inputs) > 1:
        names = [i.name for i in meta.inputs]
        missing = [n for n in names if n not in arrays]
        if missing:
            raise StageError(f"{shown}: no array named {missing}; {meta.where} takes the inputs {names}, one array "
                             f"each, and the archive holds {sorted(arrays)}")
        lengths = {len(np.atleast_1d(arrays[n])) for n in names}
        if len(lengths) != 1:
            raise StageError(f"{shown}: the input arrays have different lengths {sorted(lengths)}; one row per sample")
        x = {n: arrays[n] for n in names}
        return Batch(source=shown, names=_indexed(shown, lengths.pop()), x=x)
    if key is not None:
        if key not in arrays:
            raise StageError(f"{shown}: no array named {key!r} (--key); the archive holds {sorted(arrays)}")
        chosen = key
    elif form.name in arrays:
        chosen = form.name
    elif len(arrays) == 1:
        chosen = next(iter(arrays))
    else:
        raise StageError(f"{shown}: no array named {form.name!r} (the model's input) among {sorted(arrays)}; pass "
                         "--key NAME to choose one")
    where = f"{shown}:{chosen}"
    x = _check_array(arrays[chosen], form, where, notes)
    return Batch(source=where, names=_indexed(where, len(x)), x=x)


def _read_csv(path: Path, shown: str, form: InputForm, notes: list[str]) -> Batch:
    try:
        with open(path, newline="") as f:
            rows = [(i, r) for i, r in enumerate(csv.reader(f), start=1) if any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise StageError(f"{shown}: cannot be read as CSV ({e}); save it as UTF-8 text") from None
    if rows and not all(_is_number(c) for c in rows[0][1]):
        rows = rows[1:]  # a header row
    if not rows:
        raise StageError(f"{shown}: no data rows; one sample per row, one value per column")
    width = len(rows[0][1])
    wanted = form.features
    if wanted is None and form.sample_shape is not None and len(form.sample_shape) == 1:
        wanted = width  # a free feature count takes what the rows have
    if wanted is None:
        raise StageError(f"{shown}: CSV rows are flat, but {form.describe()} has free dimensions beyond the features; "
                         "pass the samples as .npy or .npz")
    if width != wanted:
        hint = " (drop the extra column, e.g. the label)" if width == wanted + 1 else ""
        raise StageError(f"{shown}: {width} columns per row, but the model takes {wanted} values per sample "
                         f"({form.describe()}){hint}")
    x = np.empty((len(rows), width), dtype=np.float64)
    for r, (line, cells) in enumerate(rows):
        if len(cells) != width:
            raise StageError(f"{shown}: line {line} has {len(cells)} columns, the first row {width}; fix the row")
        for c, cell in enumerate(cells):
            try:
                x[r, c] = float(cell)
            except ValueError:
                raise StageError(f"{shown}: line {line}, column {c + 1}: {cell.strip()!r} is not a number; the model "
                                 f"takes {form.describe()}") from None
    x = x.reshape((len(rows), *form.sample_shape)) if form.features is not None else x
    x = _check_array(x, form, shown, notes)
    return Batch(source=shown, names=[f"{shown}:{line}" for line, _ in rows], x=x)


def _is_number(cell: str) -> bool:
    try:
        float(cell)
        return True
    except ValueError:
        return False


def _check_array(x: np.ndarray, form: InputForm, where: str, notes: list[str]) -> np.ndarray:
    """Raw samples that fit the model: (N, *sample) (one sample gets its batch axis), numeric, finite,
    representable in an integer raw dtype. Values outside the trained raw range are a note, not an error."""
    if x.dtype.kind not in "biuf":
        raise StageError(f"{where}: holds {x.dtype} values; the model takes numbers: {form.describe()}")
    shape = form.sample_shape
    if shape is not None:
        def fits(sample: tuple) -> bool:
            return len(sample) == len(shape) and all(not isinstance(w, int) or w == g for w, g in zip(shape, sample))

        if fits(x.shape):
            x = x[None]  # one sample
        elif not (x.ndim >= 1 and fits(x.shape[1:])):
            dims = ", ".join(str(d) if isinstance(d, int) else "?" for d in shape)
            raise StageError(f"{where}: an array shaped {list(x.shape)}, but the model takes {form.describe()}: "
                             f"pass [N, {dims}] (or one sample [{dims}])")
    elif x.ndim == 0:
        x = x[None]
    if x.dtype.kind == "f":
        bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
        if bad.any():
            raise StageError(f"{where}: NaN or infinite values in {int(bad.sum())} samples (first: "
                             f"{np.flatnonzero(bad)[:5].tolist()}); the model takes finite numbers")
    target = _np_dtype(form.raw_dtype)
    if target.kind in "iu" and x.size and x.dtype != target:
        info = np.iinfo(target)
        lo, hi = float(x.min()), float(x.max())
        if x.dtype.kind == "f" and not np.all(np.mod(x, 1) == 0) or lo < info.min or hi > info.max:
            raise StageError(f"{where}: values {lo:g}..{hi:g}{' with fractions' if x.dtype.kind == 'f' else ''}, but "
                             f"the model takes {target.name} integers {info.min}..{info.max}: {form.describe()}")
    if form.raw_range and x.size:
        lo, hi = float(x.min()), float(x.max())
        if lo < form.raw_range[0] or hi > form.raw_range[1]:
            notes.append(f"{where}: values span {lo:g}..{hi:g}, outside the raw range the model was trained on "
                         f"({_num(form.raw_range[0])}..{_num(form.raw_range[1])})")
    return x


def _indexed(shown: str, n: int) -> list[str]:
    return [f"{shown}[{i}]" for i in range(n)]


# ---------------------------------------------------------------- running and reading the outputs

@dataclass
class Predictions:
    """One row per sample (``rows``: JSON-able dicts with ``input`` first), what they mean, and files written."""

    model: str
    task: str
    output: str  # the output the rows read
    kind: str  # top-k | values | reconstruction
    rows: list[dict]
    labels: list[str] = field(default_factory=list)  # value names (regression targets) for ``values`` rows
    notes: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"model": self.model, "task": self.task, "output": self.output, "kind": self.kind,
                "predictions": self.rows, "notes": self.notes, "files": self.files}


def run(model: OnnxModel, inputs: Inputs, *, top_k: int = 3, output_dir: Path | None = None,
        batch_size: int = 64) -> Predictions:
    """Run every batch (``batch_size`` samples per session call, with a progress bar on a terminal)
    and read the outputs by the file's task; ``output_dir``: predictions.csv there, and a VAE's
    reconstructions as PNG files."""
    if top_k < 1:
        raise StageError(f"--top-k must be at least 1, got {top_k}")
    if batch_size < 1:
        raise StageError(f"--batch-size must be at least 1, got {batch_size}")
    meta = model.meta
    outputs: list[dict[str, np.ndarray]] = []
    with images.progress(len(inputs), "predicting") as advance:
        for batch in inputs.batches:
            feeds = model.feed(batch.x)
            n = len(batch.names)
            parts = []
            for i in range(0, n, batch_size):
                try:
                    parts.append(model.run({k: v[i:i + batch_size] for k, v in feeds.items()}, batch_size))
                except Exception as e:  # ONNX Runtime's own error types; the message is what the user needs
                    raise PredictFailed(f"{meta.where} failed on {batch.source}: {str(e).splitlines()[0][:300]}") from None
                advance(min(batch_size, n - i))
            outputs.append({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
    names = [name for b in inputs.batches for name in b.names]
    raw = [b.x for b in inputs.batches]
    result = _interpret(meta, outputs, raw, names, top_k, output_dir)
    result.model = str(model.path)
    result.notes = list(dict.fromkeys(inputs.notes + result.notes))
    if output_dir is not None:
        result.files.append(str(_write_csv(result, Path(output_dir))))
    return result


def _interpret(meta: ModelMeta, outputs: list[dict], raw: list, names: list[str], top_k: int,
               output_dir: Path | None) -> Predictions:
    task = meta.task
    notes: list[str] = []
    if task == "classification":
        name = "probabilities" if "probabilities" in meta.output_names else meta.primary_output
        scores = np.concatenate([o[name] for o in outputs]).astype(np.float64)
        scores = scores.reshape(len(scores), -1)
        probs = scores if name == "probabilities" else softmax(scores)
        labels = list(meta.labels) or [str(i) for i in range(probs.shape[1])]
        if not meta.labels:
            notes.append(f"{meta.where} names no labels: classes are shown by index")
        return Predictions("", task, name, "top-k", _top_k_rows(names, probs, labels, top_k, "probability"),
                           notes=notes)
    if task == "regression":
        name = meta.primary_output
        values = np.concatenate([o[name] for o in outputs]).astype(np.float64)
        values = values.reshape(len(values), -1)
        targets = list(meta.target_names) or [str(i) for i in range(values.shape[1])]
        rows = [{"input": n, "values": {t: float(v) for t, v in zip(targets, row)}} for n, row in zip(names, values)]
        return Predictions("", task, name, "values", rows, labels=targets)
    if task == "vae":
        return _reconstructions(meta, outputs, raw, names, output_dir)
    # unknown: the first output, by shape
    name = meta.output_names[0]
    values = np.concatenate([o[name] for o in outputs]).astype(np.float64)
    flat = values.reshape(len(values), -1)
    labels = list(meta.labels)
    if values.ndim == 2 and flat.shape[1] > 1:
        notes.append(f"{meta.where} does not say its task: the top {top_k} of its output {name!r} by raw value "
                     "(not probabilities)" + ("" if labels else ", classes by index"))
        labels = labels if len(labels) == flat.shape[1] else [str(i) for i in range(flat.shape[1])]
        return Predictions("", task, name, "top-k", _top_k_rows(names, flat, labels, top_k, "score"), notes=notes)
    notes.append(f"{meta.where} does not say its task: its output {name!r} (shape {list(values.shape[1:])} per sample) "
                 "as it comes")
    targets = [str(i) for i in range(flat.shape[1])]
    rows = [{"input": n, "values": {t: float(v) for t, v in zip(targets, row)}} for n, row in zip(names, flat)]
    return Predictions("", task, name, "values", rows, labels=targets, notes=notes)


def softmax(scores: np.ndarray) -> np.ndarray:
    z = scores - scores.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _top_k_rows(names: list[str], scores: np.ndarray, labels: list[str], k: int, what: str) -> list[dict]:
    k = min(k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [{"input": n, "top_k": [{"label": labels[j], "index": int(j), what: float(s[j])} for j in idx]}
            for n, s, idx in zip(names, scores, order)]


def _reconstructions(meta: ModelMeta, outputs: list[dict], raw: list, names: list[str],
                     output_dir: Path | None) -> Predictions:
    """Per-sample reconstruction MSE (normalized units, as evaluate reports it) and, with ``output_dir``,
    each reconstruction in raw units as an image (NCHW with 1 or 3 channels) or in reconstructions.npy."""
    pre = meta.preprocessing
    form = InputForm.of(meta)
    notes: list[str] = []
    recon = [o["reconstruction"] for o in outputs]
    mse = np.concatenate([((r.astype(np.float64) - pre.normalized(x).astype(np.float64)) ** 2)
                          .reshape(len(r), -1).mean(axis=1) for r, x in zip(recon, raw)])
    rows = [{"input": n, "mse": float(m)} for n, m in zip(names, mse)]
    files: list[str] = []
    if output_dir is None:
        notes.append("pass --output DIR to save the reconstructions")
        return Predictions("", "vae", "reconstruction", "reconstruction", rows, notes=notes)
    out = Path(output_dir) / "reconstructions"
    out.mkdir(parents=True, exist_ok=True)
    raw_recon = [r * _stat(pre.std, r.ndim) + _stat(pre.mean, r.ndim) if pre.mean is not None else r for r in recon]
    if form.image_axes is not None and form.layout == "NCHW":
        from PIL import Image

        lo, hi = form.raw_range or (0.0, 255.0)
        for row, img in zip(rows, (a for batch in raw_recon for a in batch)):
            pixels = np.clip(np.round((img - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)
            pil = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0))
            path = out / f"{len(files):05d}-{_safe(row['input'])}.png"
            with atomic_path(path) as tmp:
                pil.save(tmp, format="PNG")
            row["reconstruction"] = str(path)
            files.append(str(path))
    else:
        path = out / "reconstructions.npy"
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, np.concatenate(raw_recon))
        files.append(str(path))
        notes.append(f"reconstructions in raw units, in input order: {path}")
    return Predictions("", "vae", "reconstruction", "reconstruction", rows, notes=notes, files=files)


def _stat(value: Any, ndim: int) -> np.ndarray:
    from stages.dataset import along_axis1

    return along_axis1(value, ndim)


def _safe(name: str) -> str:
    """A sample name as a file-name part: the last path part, without characters shells dislike."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name.replace(":", "_")).name)[-80:] or "sample"


def _write_csv(result: Predictions, out: Path) -> Path:
    """predictions.csv: one row per sample (top-k: label_i, probability_i; values: one column each)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "predictions.csv"
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        if result.kind == "top-k":
            k = max(len(r["top_k"]) for r in result.rows)
            what = next(iter(set(result.rows[0]["top_k"][0]) - {"label", "index"}))
            w.writerow(["input"] + [c for i in range(1, k + 1) for c in (f"label_{i}", f"{what}_{i}")])
            for r in result.rows:
                w.writerow([r["input"]] + [c for t in r["top_k"] for c in (t["label"], f"{t[what]:.6g}")])
        elif result.kind == "values":
            w.writerow(["input", *result.labels])
            for r in result.rows:
                w.writerow([r["input"], *(f"{v:.6g}" for v in r["values"].values())])
        else:
            w.writerow(["input", "mse", "reconstruction"])
            for r in result.rows:
                w.writerow([r["input"], f"{r['mse']:.6g}", r.get("reconstruction", "")])
    return path


def open_model(path: Path | str, device: str = "cpu") -> OnnxModel:
    """The file as an OnnxModel; one StageError when it is missing, not ONNX, or does not say how to feed it."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"model file {str(path)!r} not found; pass a .onnx path, models:/NAME@ALIAS or runs:/RUN_ID/PATH")
    try:
        return OnnxModel.open(path, device=device)  # type: ignore[arg-type]
    except StageError:
        raise
    except Exception as e:  # ONNX Runtime's load errors (InvalidProtobuf, NotImplemented for an op, ...)
        raise StageError(f"{path}: ONNX Runtime cannot load it ({str(e).splitlines()[0][:300]}); pass an ONNX "
                         "model file") from None
