"""Checkpoints: the best model (``checkpoint.pt``) and the resumable training state.

``checkpoint.pt`` rebuilds its model alone: weights plus the model's plain-dict description, label
names, normalization, task and lineage. It is what evaluate, export and fine-tuning read.
The training state (``train_state.pt``, written every ``train.checkpoint_every`` epochs) holds what
``pipeline train --resume`` needs to continue a killed run exactly: model, optimizer, schedule and
gradient-scaler states, the RNG states of python / numpy / torch / the shuffling generator, the epoch,
the best-so-far, the history and the early-stopping counters.
Both are written to a temporary name and renamed (a kill mid-write keeps the previous file) and both
load with ``weights_only=True`` (no pickled code).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np

import models
from stages.common import BadFile, StageError, atomic_path, one_line, require, write_json

log = logging.getLogger(__name__)

FORMAT = "onnx-pipeline.checkpoint/1"
STATE_FORMAT = "onnx-pipeline.train-state/1"


def _cpu_state(model) -> dict:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def save(path: Path, model, meta: dict[str, Any], json_path: Path | None = None) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, **meta, "state_dict": _cpu_state(model)}, tmp)
    if json_path is not None:
        write_json(json_path, {"format": FORMAT, **meta})


def _read(path: Path, fmt: str, what: str, fix: str) -> dict:
    import warnings

    import torch

    try:
        with warnings.catch_warnings():  # torch warns (on stderr) about pickle protocols of files it then refuses
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BadFile(path, f"is corrupt or not {what} ({_load_error(e)})", fix) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != fmt:
        raise BadFile(path, f"is not {what} (format {fmt} expected)", fix)
    return ckpt


def _load_error(e: Exception) -> str:
    """torch.load's error, whole but on one line. A weights-only refusal keeps torch's advice about
    ``weights_only=False`` (a file that holds pickled code runs it when loaded so), and says this project
    never loads that way; a truncated file says so instead of torch's bare errno."""
    text = one_line(e, 1500)
    if "weights_only" in text or "WeightsUnpickler" in text:
        return (f"{type(e).__name__}: {text} (onnx-pipeline loads checkpoints with weights_only=True only: "
                "a file holding pickled Python objects is refused, never executed)")
    if isinstance(e, (OSError, EOFError, RuntimeError)) and ("zip" in text.lower() or "Errno" in text or not text):
        return f"{type(e).__name__}: {text or 'no detail'}: truncated, or not a PyTorch zip archive"
    return f"{type(e).__name__}: {text}"


def read(path: Path) -> dict:
    """The raw checkpoint dict (metadata and ``state_dict``), checked."""
    require(path, "train")
    return _read(path, FORMAT, "a checkpoint", "rerun `pipeline train`")


def load(path: Path):
    """-> (model in eval mode on CPU, metadata dict without the weights)."""
    ckpt = read(path)
    model = models.rebuild(ckpt["model"])
    model.load_state_dict(ckpt["state_dict"])
    meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
    return model.eval(), meta


# ---------------------------------------------------------------- fine-tuning

def init_from(model, path: Path) -> list[str]:
    """Load another run's weights into ``model`` for fine-tuning; returns what was done, line by line.

    Every tensor must match by name and shape, except the output layer's (``models.output_layer``):
    when the label count differs, that layer keeps its fresh initialization. Any other mismatch is
    one StageError listing all of them.
    """
    src = read(Path(path))["state_dict"]
    head = models.output_layer(model)
    dst = model.state_dict()
    notes, problems, loaded = [], [], {}
    for key, tensor in dst.items():
        if key not in src:
            problems.append(f"`{key}` {tuple(tensor.shape)} is missing from the checkpoint")
        elif tuple(src[key].shape) == tuple(tensor.shape):
            loaded[key] = src[key]
        elif key.startswith(head + "."):
            notes.append(f"replaced the head `{key}`: {tuple(src[key].shape)} in {path} -> {tuple(tensor.shape)} here")
        else:
            problems.append(f"`{key}` is {tuple(src[key].shape)} in the checkpoint but {tuple(tensor.shape)} here")
    problems += [f"`{k}` in the checkpoint has no place in this model" for k in src if k not in dst]
    if problems:
        raise StageError(f"cannot initialize from {path}: the architectures differ beyond the head `{head}` "
                         f"({len(problems)} mismatches: {'; '.join(problems[:8])}"
                         f"{'; ...' if len(problems) > 8 else ''}); use the same model section as that run")
    model.load_state_dict({**dst, **loaded})
    return [f"initialized {len(loaded)}/{len(dst)} tensors from {path}", *notes]


# ---------------------------------------------------------------- resumable state

def rng_state(shuffle_generator) -> dict[str, Any]:
    """Every random stream the loop draws from, in weights_only-loadable types."""
    import torch

    kind, key, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": [kind, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state(),
             "shuffle": shuffle_generator.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], shuffle_generator) -> None:
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    shuffle_generator.set_state(state["shuffle"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(path: Path, state: dict[str, Any]) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save({"format": STATE_FORMAT, **state}, tmp)


def load_state(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise StageError(f"no resumable training state at {path}: the run never reached its first "
                         "`train.checkpoint_every` epoch; train again without --resume")
    return _read(path, STATE_FORMAT, "a resumable training state", "train again without --resume")
