"""Checkpoints that rebuild their model alone: weights plus the model's plain-dict description,
label names, normalization and lineage. Loaded with ``weights_only=True`` (no pickled code)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import models
from stages.common import StageError, atomic_path, require, write_json

FORMAT = "onnx-pipeline.checkpoint/1"


def save(path: Path, model, meta: dict[str, Any], json_path: Path | None = None) -> None:
    import torch

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, **meta, "state_dict": state}, tmp)
    if json_path is not None:
        write_json(json_path, {"format": FORMAT, **meta})


def load(path: Path):
    """-> (model in eval mode on CPU, metadata dict without the weights)."""
    import torch

    require(path, "train")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise StageError(f"{path} is corrupt or not a checkpoint ({type(e).__name__}: {str(e)[:200]}); "
                         "rerun `pipeline train`") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise StageError(f"{path} is not an onnx-pipeline checkpoint (format {FORMAT} expected); rerun `pipeline train`")
    model = models.rebuild(ckpt["model"])
    model.load_state_dict(ckpt["state_dict"])
    meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
    return model.eval(), meta
