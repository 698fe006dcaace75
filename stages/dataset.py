"""Reading prepare's output (data.npz + dataset.json) back, with clear errors for missing or bad files."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.common import StageError, read_json, require


@dataclass(frozen=True)
class Data:
    info: dict
    arrays: dict[str, np.ndarray]

    @property
    def labels(self) -> list[str]:
        return list(self.info["label_names"])

    @property
    def mean(self) -> float:
        return float(self.info["normalization"]["mean"])

    @property
    def std(self) -> float:
        return float(self.info["normalization"]["std"])

    def normalize(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.std).astype(np.float32)

    def split(self, name: str, normalized: bool = True) -> tuple[np.ndarray, np.ndarray]:
        x, y = self.arrays[f"x_{name}"], self.arrays[f"y_{name}"]
        return (self.normalize(x) if normalized else x), y


def load(data_path: Path, info_path: Path) -> Data:
    info = read_json(info_path, "prepare")
    require(data_path, "prepare")
    try:
        with np.load(data_path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise StageError(f"{data_path} is corrupt ({e}); rerun `pipeline prepare`") from None
    for s in ("train", "val", "test"):
        if f"x_{s}" not in arrays or f"y_{s}" not in arrays:
            raise StageError(f"{data_path} lacks the {s} split; rerun `pipeline prepare`")
    return Data(info=info, arrays=arrays)
