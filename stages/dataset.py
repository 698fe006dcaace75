"""Reading prepare's output (data.npz + dataset.json) back, with clear errors for missing or bad files."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.common import BadFile, StageError, read_json, require

UNLABELED = "unlabeled"  # a dataset of inputs only (y of shape (N, 0)): prepare.task unlabeled


@dataclass(frozen=True)
class Data:
    info: dict
    arrays: dict[str, np.ndarray]

    @property
    def task(self) -> str:
        """classification | regression | unlabeled (what the dataset's targets are; a VAE ignores them)."""
        return self.info.get("task", "classification")  # files from before tasks were classification

    @property
    def labeled(self) -> bool:
        """False for inputs without targets (calibration and agreement data for an imported file)."""
        return self.task != UNLABELED

    @property
    def labels(self) -> list[str]:
        """Class names (classification) or target names (regression): what the model's outputs mean."""
        return list(self.info["label_names"] if self.task == "classification" else self.info["target_names"])

    @property
    def num_outputs(self) -> int:
        """Model outputs the dataset asks for: classes or regression targets."""
        return len(self.labels)

    @property
    def mean(self) -> float | list[float]:
        return self.info["normalization"]["mean"]

    @property
    def std(self) -> float | list[float]:
        return self.info["normalization"]["std"]

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """(x - mean) / std as float32; a list mean/std holds one value per entry of axis 1
        (channels of NCHW / NCL, features of NF)."""
        return normalize(x, self.mean, self.std)

    def split(self, name: str, normalized: bool = True) -> tuple[np.ndarray, np.ndarray]:
        x, y = self.arrays[f"x_{name}"], self.arrays[f"y_{name}"]
        return (self.normalize(x) if normalized else x), y


def along_axis1(value: Any, ndim: int) -> np.ndarray:
    """A float, or a list with one value per channel/feature (axis 1), shaped to broadcast over a batch
    of ``ndim`` dimensions (float32)."""
    a = np.asarray(value, dtype=np.float32)
    return a if a.ndim == 0 else a.reshape((1, a.size) + (1,) * (ndim - 2))


def normalize(x: np.ndarray, mean: Any, std: Any) -> np.ndarray:
    """``(float32(x) - mean) / std`` with scalar or per-channel/feature (axis 1) statistics: the one
    implementation (Data.normalize, stages.onnx_model's feeding; export's InGraph does it in torch)."""
    x = np.asarray(x).astype(np.float32, copy=False)
    return ((x - along_axis1(mean, x.ndim)) / along_axis1(std, x.ndim)).astype(np.float32, copy=False)


def load(data_path: Path, info_path: Path) -> Data:
    info = read_json(info_path, "prepare")
    require(data_path, "prepare")
    try:
        with np.load(data_path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise BadFile(data_path, f"is corrupt ({e})", "rerun `pipeline prepare`") from None
    for s in ("train", "val", "test"):
        if f"x_{s}" not in arrays or f"y_{s}" not in arrays:
            raise StageError(f"{data_path} lacks the {s} split; rerun `pipeline prepare`")
    return Data(info=info, arrays=arrays)
