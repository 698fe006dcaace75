"""prepare: a dataset source -> seeded train/val/test split -> data.npz + dataset.json.

Sources (stages/sources.py): bundled digits, MNIST-1D (generated offline), diabetes, and user files
(IDX directory, .npz, .csv, a folder of images). ``task: unlabeled`` reads inputs without targets (y
arrays of shape (N, 0)): calibration and agreement data for an imported ONNX file, which quantize judges
against its fp32 file. ``dataset: none`` is no data at all (an imported file that is only checked and
described). Raw inputs are stored as they come (digits 0..16 float32, IDX and image-folder uint8 pixels,
...) with normalization statistics computed on the training split only: one mean/std for
single-channel images and signals, one per channel otherwise, one per feature for feature vectors.
Every consumer normalizes with those statistics (``stages.dataset.Data.normalize``), and the
exported model's metadata repeats them so apps do the same. Classification splits are stratified.
Sources with a test split of their own (MNIST-1D, IDX with t10k-* files, an image folder with test/)
keep it as it is and carve validation from their training split unless they have one too (an image
folder with val/).

Subsets for transfer learning: ``classes`` keeps some classes of a classification source (in the
source's order, relabelled 0..k-1, their names kept), ``samples_per_class`` cuts the training split to
that many samples per class (validation and test keep their sizes, so scores stay measurable).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass, field
from typing import Literal, Union

import numpy as np

from stages import sources
from stages.common import StageError, atomic_path, write_json
from stages.contract import RunDir, Tracker


log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
FILE_DATASETS = ("idx", "npz", "csv", "images")  # read from prepare.path; the others ship with the install


@dataclass(frozen=True)
class ImagesConfig:
    """prepare.images: how a folder of images (``dataset: images``) is decoded (``stages.images``)."""

    size: tuple[int, ...] = ()  # [height, width] every image is resized to; empty: their own (one) size
    channels: Literal[1, 3] = 3  # 1: grayscale (a color image is an error); 3: RGB (grayscale is replicated)
    # Decoding processes. 0: automatic: this process unless decoding would take over 10 s here and two
    # or more cores are idle (stages.images.auto_workers); 1: this process; N: a pool of N.
    workers: int = 0

    def __post_init__(self) -> None:
        from stages.images import MAX_SIDE

        if len(self.size) not in (0, 2) or any(not 1 <= s <= MAX_SIDE for s in self.size):
            raise ValueError(f"`size` must be [height, width] with each side 1..{MAX_SIDE} pixels (or [] for the "
                             f"images' own size), got {list(self.size)}")
        if self.workers < 0:
            raise ValueError(f"`workers` must be 0 (automatic) or a count of processes, got {self.workers}")


@dataclass(frozen=True)
class Config:
    dataset: Literal["digits", "mnist1d", "diabetes", "idx", "npz", "csv", "images", "none"] = "digits"
    path: str = ""  # idx: a directory of IDX files; npz, csv: the file; images: the folder of class folders
    features: tuple[str, ...] = ()  # npz: array key(s); csv: column names (empty: every column but the label)
    label: str = ""  # npz: array key; csv: column name
    # npz/csv; auto: integer labels are classes; unlabeled: inputs only (no `label`)
    task: Literal["auto", "classification", "regression", "unlabeled"] = "auto"
    layout: Literal["auto", "NF", "NCL", "NCHW"] = "auto"  # npz: how to read one (N, ...) feature array
    val_fraction: float = 0.15  # of all samples, or of the train split where the source has its own test split
    test_fraction: float = 0.2  # unused where the source has its own test split
    seed: int = 0
    max_samples: int = 0  # 0: the whole dataset; a (stratified) subsample otherwise (tiny test recipes)
    images: ImagesConfig = field(default_factory=ImagesConfig)  # dataset images: size, channels, workers
    classes: tuple[Union[int, str], ...] = ()  # keep only these classes (names, or digits as numbers); empty: all
    samples_per_class: int = 0  # the training split keeps this many samples per class; 0: all

    def __post_init__(self) -> None:
        for name in ("val_fraction", "test_fraction"):
            v = getattr(self, name)
            if not 0.0 < v < 0.5:
                raise ValueError(f"`{name}` must be between 0 and 0.5 (exclusive), got {v}")
        if self.max_samples < 0 or 0 < self.max_samples < 100:
            raise ValueError(f"`max_samples` must be 0 (all) or at least 100, got {self.max_samples}")
        if self.dataset in FILE_DATASETS and not self.path:
            what = {"idx": "a directory holding train-images-idx3-ubyte[.gz]",
                    "images": "a folder holding one subfolder of images per class"}.get(self.dataset, f"a .{self.dataset} file")
            raise ValueError(f"`path` is required for dataset {self.dataset}: set it to {what}")
        if self.dataset == "none" and self.path:
            raise ValueError("`path` does not apply to dataset none (no data)")
        if self.dataset not in FILE_DATASETS and self.dataset != "none" and self.path:
            raise ValueError(f"`path` applies to the idx, npz, csv and images datasets only; {self.dataset} ships with "
                             "the install")
        if self.dataset != "images" and self.images != ImagesConfig():
            raise ValueError(f"`images` applies to the images dataset only, not {self.dataset}")
        tabular = ("npz", "csv")
        if self.dataset in tabular and not self.label and self.task != "unlabeled":
            raise ValueError(f"`label` is required for dataset {self.dataset}: the "
                             f"{'array key' if self.dataset == 'npz' else 'column'} holding the targets "
                             "(or `task: unlabeled` for inputs without targets)")
        if self.task == "unlabeled" and self.label:
            raise ValueError(f"`task: unlabeled` reads inputs only, yet `label` is {self.label!r}; drop one of them")
        if self.dataset == "npz" and not self.features:
            raise ValueError("`features` is required for dataset npz: the array key(s) holding the inputs")
        for name, default in (("features", ()), ("label", ""), ("task", "auto")):
            if self.dataset not in tabular and getattr(self, name) != default:
                raise ValueError(f"`{name}` applies to the npz and csv datasets only, not {self.dataset}")
        if self.dataset != "npz" and self.layout != "auto":
            raise ValueError(f"`layout` applies to the npz dataset only, not {self.dataset}")
        if self.label and self.label in self.features:
            raise ValueError(f"`label` {self.label!r} is also listed in `features`; a model must not see its target")
        if len({str(c) for c in self.classes}) != len(self.classes):
            raise ValueError(f"`classes` lists a class twice: {list(self.classes)}")
        if len(self.classes) == 1:
            raise ValueError(f"`classes` must keep at least two classes, got {list(self.classes)}")
        if self.samples_per_class < 0:
            raise ValueError(f"`samples_per_class` must be >= 0 (0: all), got {self.samples_per_class}")


@dataclass(frozen=True)
class Result:
    sizes: dict[str, int]
    sha256: str
    num_classes: int  # 0 unless the task is classification
    task: str = "classification"
    num_outputs: int = 0  # classes or regression targets

    def summary(self) -> str:
        return (f"{sum(self.sizes.values())} samples ({'/'.join(str(self.sizes[s]) for s in SPLITS)}) "
                f"{self.task} {self.sha256[:8]}")


def content_hash(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over names, dtypes, shapes and bytes in a fixed order (the .npz file's zip timestamps vary)."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _cut(x, y, size, stratified: bool, seed: int, what: str):
    """-> (x_a, x_b, y_a, y_b) with ``size`` (a fraction or a count) in b; stratified for classes."""
    from sklearn.model_selection import train_test_split

    try:
        return train_test_split(x, y, test_size=size, stratify=y if stratified else None, random_state=seed)
    except ValueError as e:  # e.g. a class with a single sample cannot be stratified
        raise StageError(f"cannot split off the {what} split: {e}; use more samples per class "
                         "(or a larger max_samples)") from None


def _keep(x, y, n: int, stratified: bool, seed: int):
    """A (stratified) subsample of ``n`` rows, or everything when there are no more."""
    if n >= len(x):
        return x, y
    x_kept, _, y_kept, _ = _cut(x, y, len(x) - n, stratified, seed, "subsample")
    return x_kept, y_kept


def select_classes(src: sources.Source, classes: tuple) -> sources.Source:
    """The source with only ``classes`` (matched by name; in the source's order), relabelled 0..k-1."""
    if src.task != "classification":
        raise StageError(f"prepare.classes applies to classification datasets; {src.info['name']} is {src.task}: "
                         "remove prepare.classes")
    wanted = {str(c) for c in classes}
    unknown = sorted(wanted - set(src.names))
    if unknown:
        raise StageError(f"prepare.classes names {unknown}, which {src.info['name']} does not have; its classes: "
                         f"{src.names}")
    keep = [i for i, name in enumerate(src.names) if name in wanted]
    relabel = np.full(len(src.names), -1, dtype=np.int64)
    relabel[keep] = np.arange(len(keep))

    def cut(x, y):
        if x is None:
            return None, None
        mask = np.isin(y, keep)
        return x[mask], relabel[y[mask]]

    x, y = cut(src.x, src.y)
    x_test, y_test = cut(src.x_test, src.y_test)
    return dataclasses.replace(src, x=x, y=y, x_test=x_test, y_test=y_test, names=[src.names[i] for i in keep],
                               info={**src.info, "classes_kept": [src.names[i] for i in keep]})


def per_class(x: np.ndarray, y: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``n`` samples of each class, drawn with ``seed``, in their original order."""
    rng = np.random.default_rng(seed)
    rows = [rng.permutation(np.flatnonzero(y == c))[:n] for c in np.unique(y)]
    kept = np.sort(np.concatenate(rows))
    short = {int(c): int((y == c).sum()) for c in np.unique(y) if (y == c).sum() < n}
    if short:
        log.warning("prepare.samples_per_class=%d: the training split has fewer for classes %s", n, short)
    return x[kept], y[kept]


def split(src: sources.Source, config: Config) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    stratified = src.task == "classification"
    x, y = src.x, src.y
    x_test, y_test = src.x_test, src.y_test
    x_val, y_val = src.x_val, src.y_val
    if config.max_samples:
        total = len(x) + sum(len(a) for a in (x_test, x_val) if a is not None)
        if config.max_samples < total:
            # Keep the proportions of the source's own splits.
            n_test = round(config.max_samples * len(x_test) / total) if x_test is not None else 0
            n_val = round(config.max_samples * len(x_val) / total) if x_val is not None else 0
            x, y = _keep(x, y, config.max_samples - n_test - n_val, stratified, config.seed)
            if x_test is not None:
                x_test, y_test = _keep(x_test, y_test, n_test, stratified, config.seed)
            if x_val is not None:
                x_val, y_val = _keep(x_val, y_val, n_val, stratified, config.seed)
    if x_test is None:
        x, x_test, y, y_test = _cut(x, y, config.test_fraction, stratified, config.seed, "test")
        val_size = config.val_fraction / (1.0 - config.test_fraction)
    else:
        val_size = config.val_fraction
    if x_val is None:
        x_train, x_val, y_train, y_val = _cut(x, y, val_size, stratified, config.seed, "validation")
    else:
        x_train, y_train = x, y
    if config.samples_per_class:
        if not stratified:
            raise StageError(f"prepare.samples_per_class applies to classification datasets; {src.info['name']} is "
                             f"{src.task}: use prepare.max_samples")
        x_train, y_train = per_class(x_train, y_train, config.samples_per_class, config.seed)
    return {"train": (x_train, y_train), "val": (x_val, y_val), "test": (x_test, y_test)}


def normalization(x_train: np.ndarray, layout: str) -> dict:
    """mean/std from the training split: per feature (NF), per channel (NCL, NCHW; one float for one channel)."""
    axes = (0,) if layout == "NF" else tuple(i for i in range(x_train.ndim) if i != 1)
    if x_train.size * 8 > STATS_CHUNK_BYTES:  # the bytes of a float64 copy
        mean, std = _chunked_mean_std(x_train, axes)
    else:
        x64 = x_train.astype(np.float64)
        mean, std = x64.mean(axis=axes), x64.std(axis=axes)
    if (std == 0).any():  # a constant feature carries nothing; dividing by 1 keeps it finite
        log.warning("%d constant input %s(s) in the training split; their std is set to 1",
                    int((std == 0).sum()), "feature" if layout == "NF" else "channel")
        std = np.where(std == 0, 1.0, std)
    per = "feature" if layout == "NF" else "channel"
    if layout != "NF" and len(mean) == 1:
        return {"mean": float(mean[0]), "std": float(std[0]), "per": "all", "formula": "(x - mean) / std"}
    return {"mean": mean.tolist(), "std": std.tolist(), "per": per,
            "formula": f"(x - mean) / std, one mean/std per {per} (axis 1)"}


# A float64 copy of the training split larger than this (bytes) is not made at once: 10,000 RGB images
# of 224x224 are 1.5 GB as uint8 but 12 GB as float64. Smaller splits take the one-pass numpy path.
STATS_CHUNK_BYTES = 512 * 2**20


def _chunked_mean_std(x: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """mean and (population) std over ``axes`` (axis 0 among them) in float64, two passes over blocks of
    samples: the same numbers as numpy's one pass to ~1e-12, at a block's memory."""
    block = max(1, STATS_CHUNK_BYTES // 8 // max(1, x[0].size))
    count = x.size // int(np.prod([x.shape[i] for i in range(x.ndim) if i not in axes]))
    total = sum(x[i:i + block].astype(np.float64).sum(axis=axes) for i in range(0, len(x), block))
    mean = total / count
    shape = [1 if i in axes else n for i, n in enumerate(x.shape)]
    squares = sum(((x[i:i + block].astype(np.float64) - mean.reshape(shape)) ** 2).sum(axis=axes)
                  for i in range(0, len(x), block))
    return mean, np.sqrt(squares / count)


def run(config: Config, rundir: "RunDir", tracker: "Tracker") -> Result:
    tracker.log_params(dataclasses.asdict(config))  # nested sections (images) flatten to images.size, ...
    src = sources.load(config)
    if config.classes:
        src = select_classes(src, config.classes)
    if src.x_test is not None and config.test_fraction != Config.test_fraction:
        log.warning("%s has a test split of its own; prepare.test_fraction is not used", src.info["name"])
    if src.x_val is not None and config.val_fraction != Config.val_fraction:
        log.warning("%s has a validation split of its own; prepare.val_fraction is not used", src.info["name"])
    parts = split(src, config)
    arrays = {}
    for name, (xs, ys) in parts.items():
        arrays[f"x_{name}"], arrays[f"y_{name}"] = xs, ys
    x_train = parts["train"][0]
    # Statistics from the training split only, so validation and test stay unseen.
    norm = normalization(x_train, src.layout)
    digest = content_hash(arrays)

    with atomic_path(rundir.data) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a path
            np.savez(f, **arrays)
    value_range = src.info.get("value_range") or [float(src.x.min()), float(src.x.max())]
    info = {
        **src.info,
        "value_range": value_range,
        "task": src.task,
        "splits": {s: int(len(parts[s][1])) for s in SPLITS},
        "test_split": "source" if src.x_test is not None else "carved",
        **({"val_split": "source"} if src.x_val is not None else {}),
        "input_shape": list(src.x.shape[1:]),
        "input_layout": src.layout,
        "dtype": "float32",  # what models see, after normalization
        "raw_dtype": str(x_train.dtype),  # what data.npz stores
        "normalization": norm,
        "seed": config.seed,
        "sha256": digest,
    }
    if src.task == "classification":
        info["class_counts"] = {s: np.bincount(parts[s][1], minlength=len(src.names)).tolist() for s in SPLITS}
        info["label_names"] = src.names
        info["num_classes"] = len(src.names)
    else:
        info["target_names"] = src.names
        info["num_targets"] = len(src.names)
    write_json(rundir.dataset, info)
    log.info("prepared %s (%s, %s): %s", src.info["name"], src.task, src.layout, info["splits"])

    tracker.log_metrics({f"samples_{s}": n for s, n in info["splits"].items()})
    tracker.set_tags({"dataset.name": src.info["name"], "dataset.sha256": digest, "dataset.task": src.task})
    tracker.log_dataset(name=src.info["name"], digest=digest, source=src.info["source"],
                        features=arrays["x_train"], targets=arrays["y_train"], context="training")
    tracker.log_artifact(rundir.dataset)
    return Result(sizes=info["splits"], sha256=digest, num_classes=info.get("num_classes", 0), task=src.task,
                  num_outputs=len(src.names))
