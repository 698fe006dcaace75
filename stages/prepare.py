"""prepare: a bundled dataset -> seeded stratified train/val/test split -> data.npz + dataset.json.

Raw inputs are stored as they come (digits: 8x8 pixel intensities 0..16, float32, NCHW) with the
normalization statistics computed on the training split only; every consumer normalizes with those
statistics, and the exported model's metadata repeats them so apps do the same.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from stages.common import atomic_path, write_json

if TYPE_CHECKING:
    from pipeline.rundir import RunDir
    from pipeline.tracking import Tracker

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Config:
    dataset: Literal["digits"] = "digits"
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    seed: int = 0
    max_samples: int = 0  # 0: the whole dataset; a stratified subsample otherwise (tiny test recipes)

    def __post_init__(self) -> None:
        for name in ("val_fraction", "test_fraction"):
            v = getattr(self, name)
            if not 0.0 < v < 0.5:
                raise ValueError(f"`{name}` must be between 0 and 0.5 (exclusive), got {v}")
        if self.max_samples < 0 or 0 < self.max_samples < 100:
            raise ValueError(f"`max_samples` must be 0 (all) or at least 100, got {self.max_samples}")


@dataclass(frozen=True)
class Result:
    sizes: dict[str, int]
    sha256: str
    num_classes: int

    def summary(self) -> str:
        return f"{sum(self.sizes.values())} samples ({'/'.join(str(self.sizes[s]) for s in SPLITS)}) {self.sha256[:8]}"


def load_source(name: str) -> tuple[np.ndarray, np.ndarray, list[str], dict]:
    """Inputs (N, C, H, W) float32, labels int64, label names, and a description of the source."""
    if name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()  # ships inside scikit-learn: no download
        x = bunch.images.astype(np.float32)[:, None, :, :]
        y = bunch.target.astype(np.int64)
        labels = [str(int(t)) for t in bunch.target_names]
        return x, y, labels, {
            "name": "digits",
            "source": "sklearn.datasets.load_digits",
            "description": "UCI optical recognition of handwritten digits: 8x8 images, intensities 0..16",
            "value_range": [0.0, 16.0],
        }
    raise ValueError(f"unknown dataset {name!r}")


def content_hash(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over names, dtypes, shapes and bytes in a fixed order (the .npz file's zip timestamps vary)."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def split(x: np.ndarray, y: np.ndarray, config: Config) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import train_test_split

    if config.max_samples and config.max_samples < len(x):
        x, _, y, _ = train_test_split(x, y, train_size=config.max_samples, stratify=y, random_state=config.seed)
    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=config.test_fraction, stratify=y, random_state=config.seed)
    val_of_rest = config.val_fraction / (1.0 - config.test_fraction)
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=val_of_rest, stratify=y_rest, random_state=config.seed)
    return {"train": (x_train, y_train), "val": (x_val, y_val), "test": (x_test, y_test)}


def run(config: Config, rundir: "RunDir", tracker: "Tracker") -> Result:
    tracker.log_params(config.__dict__)
    x, y, labels, source = load_source(config.dataset)
    parts = split(x, y, config)
    arrays = {}
    for name, (xs, ys) in parts.items():
        arrays[f"x_{name}"], arrays[f"y_{name}"] = xs, ys
    x_train = parts["train"][0]
    # Statistics from the training split only, so validation and test stay unseen.
    mean, std = float(x_train.mean()), float(x_train.std())
    digest = content_hash(arrays)

    with atomic_path(rundir.data) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a path
            np.savez(f, **arrays)
    info = {
        **source,
        "splits": {s: int(len(parts[s][1])) for s in SPLITS},
        "class_counts": {s: np.bincount(parts[s][1], minlength=len(labels)).tolist() for s in SPLITS},
        "input_shape": list(x.shape[1:]),
        "input_layout": "NCHW",
        "dtype": "float32",
        "label_names": labels,
        "num_classes": len(labels),
        "normalization": {"mean": mean, "std": std, "formula": "(x - mean) / std"},
        "seed": config.seed,
        "sha256": digest,
    }
    write_json(rundir.dataset, info)
    log.info("prepared %s: %s, mean %.3f std %.3f", source["name"], info["splits"], mean, std)

    tracker.log_metrics({f"samples_{s}": n for s, n in info["splits"].items()})
    tracker.set_tags({"dataset.name": source["name"], "dataset.sha256": digest})
    tracker.log_dataset(name=source["name"], digest=digest, source=source["source"],
                        features=arrays["x_train"], targets=arrays["y_train"], context="training")
    tracker.log_artifact(rundir.dataset)
    return Result(sizes=info["splits"], sha256=digest, num_classes=len(labels))
