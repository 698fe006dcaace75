"""Checkpoints: the best model (``checkpoint.pt``) and the resumable training state.

``checkpoint.pt`` rebuilds its model alone: weights plus the model's plain-dict description, label
names, normalization, task and lineage. It is what evaluate, export and fine-tuning read. A custom
model's description names its factory, so loading its checkpoint imports that (the user's) module.
``load_weights`` starts a model from other weights (a checkpoint of ours, a state dict, a .safetensors
file) and reports which tensors were loaded, skipped (shape mismatch), missing or unexpected.
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
from dataclasses import asdict, dataclass, field
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


# ---------------------------------------------------------------- starting from other weights

# State-dict key prefixes that wrappers add: DistributedDataParallel's and torch.compile's.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
WEIGHT_FILES = (".pt", ".pth", ".bin", ".safetensors")


@dataclass
class WeightsReport:
    """What ``load_weights`` did, tensor by tensor; written to the run directory as JSON."""

    source: str
    format: str  # checkpoint (ours), state_dict (torch.save of a dict of tensors), safetensors
    head: str  # the output layer's module name (models.output_layer or train.finetune.head)
    strict: bool
    loaded: list[str] = field(default_factory=list)  # in the file and the model, same shape: copied
    skipped: list[dict] = field(default_factory=list)  # in both, shapes differ: kept fresh (name, file, model)
    missing: list[str] = field(default_factory=list)  # in the model, not in the file: kept fresh
    unexpected: list[str] = field(default_factory=list)  # in the file, no place in the model: ignored
    new_head: list[str] = field(default_factory=list)  # the head's tensors, kept freshly initialized
    new_head_reason: str = ""
    stripped_prefix: str = ""  # a wrapper's key prefix removed from the file's names

    def counts(self) -> dict[str, int]:
        return {k: len(getattr(self, k)) for k in ("loaded", "skipped", "missing", "unexpected", "new_head")}

    def to_dict(self) -> dict:
        return {**asdict(self), "counts": self.counts()}

    def lines(self) -> list[str]:
        """The report in words, one line per kind that is not empty."""
        total = len(self.loaded) + len(self.skipped) + len(self.missing) + len(self.new_head)
        out = [f"loaded {len(self.loaded)}/{total} tensors from {self.source} ({self.format}"
               f"{', prefix ' + repr(self.stripped_prefix) + ' stripped' if self.stripped_prefix else ''})"]
        if self.new_head:
            out.append(f"new head `{self.head}` ({self.new_head_reason}): {', '.join(self.new_head)} freshly initialized")
        return out + self.problems()

    def problems(self) -> list[str]:
        """What strict loading refuses: skipped, missing and unexpected tensors, one line per kind."""
        out = []
        if self.skipped:
            out.append("skipped (shape mismatch): " + "; ".join(
                f"`{s['name']}` {tuple(s['file_shape'])} in the file, {tuple(s['model_shape'])} here" for s in self.skipped))
        if self.missing:
            out.append(f"missing from the file (freshly initialized): {', '.join(self.missing)}")
        if self.unexpected:
            out.append(f"in the file but not in this model (ignored): {', '.join(self.unexpected)}")
        return out


def read_weights(path: Path) -> tuple[dict, str, dict]:
    """-> (state dict of tensors, format, metadata of our checkpoint or {}). Reads a checkpoint.pt of ours,
    a torch.save'd state dict (or a dict holding one under state_dict / model / model_state_dict) and a
    .safetensors file; never unpickles code (``weights_only=True``)."""
    import torch

    path = Path(path)
    fix = "give a .pt/.pth file saved with torch.save(model.state_dict(), FILE), a .safetensors file or a checkpoint.pt"
    if not path.is_file():
        raise StageError(f"weights file {path} does not exist; {fix}")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise StageError(f"reading {path} needs the safetensors package ({e}); pip install safetensors") from None
        try:
            return load_file(str(path), device="cpu"), "safetensors", {}
        except Exception as e:
            raise StageError(f"{path} is not a readable .safetensors file ({type(e).__name__}: {str(e)[:200]})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise StageError(f"{path} cannot be read with weights_only=True ({type(e).__name__}: {str(e)[:200]}); it may "
                         f"be corrupt or hold pickled objects (a whole model, not its state dict); {fix}") from None

    def tensors(value) -> bool:
        return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())

    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return obj["state_dict"], "checkpoint", {k: v for k, v in obj.items() if k != "state_dict"}
    if isinstance(obj, dict) and obj.get("format") == STATE_FORMAT:
        return obj["model"], "train_state", {}
    if tensors(obj):
        return obj, "state_dict", {}
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and tensors(obj.get(key)):
            return obj[key], f"state_dict (under `{key}`)", {}
    keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
    raise StageError(f"{path} holds no state dict of tensors (found {keys}); {fix}")


def _strip_wrapper(src: dict, dst: dict) -> tuple[dict, str]:
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in src) and not any(k.startswith(prefix) for k in dst):
            return {k[len(prefix):]: v for k, v in src.items()}, prefix
    return src, ""


def load_weights(model, path: Path, *, head: str, strict: bool = True, labels: list[str] | None = None) -> WeightsReport:
    """Copy the tensors of ``path`` into ``model`` by name where the shapes agree; report every tensor.

    The head (module ``head``) is left freshly initialized when the label set differs: its shape differs,
    or the file is a checkpoint of ours whose label names differ from ``labels`` (digits 0-4 -> 5-9).
    ``strict``: anything else that does not load (skipped, missing or unexpected tensors) is one
    StageError listing all of it. Loading nothing at all is always an error (the wrong file).
    """
    src, fmt, meta = read_weights(path)
    dst = model.state_dict()
    src, stripped = _strip_wrapper(src, dst)
    in_head = (lambda k: k.startswith(head + ".")) if head else (lambda k: False)
    report = WeightsReport(source=str(path), format=fmt, head=head, strict=strict, stripped_prefix=stripped)
    file_labels = meta.get("label_names")
    if head and labels is not None and file_labels and list(file_labels) != list(labels):
        report.new_head_reason = f"label set differs: {list(file_labels)} in the file, {list(labels)} here"
    loaded = {}
    for key, tensor in dst.items():
        here = tuple(tensor.shape)
        if in_head(key) and report.new_head_reason:
            report.new_head.append(key)
        elif key not in src:
            (report.new_head if in_head(key) else report.missing).append(key)
        elif tuple(src[key].shape) == here:
            report.loaded.append(key)
            loaded[key] = src[key]
        elif in_head(key):
            report.new_head.append(key)
            report.new_head_reason = report.new_head_reason or (
                f"output size differs: {tuple(src[key].shape)} in the file, {here} here")
        else:
            report.skipped.append({"name": key, "file_shape": list(src[key].shape), "model_shape": list(here)})
    report.unexpected = [k for k in src if k not in dst]
    if report.new_head and not report.new_head_reason:
        report.new_head_reason = "the file has no head"
    if not loaded:
        raise StageError(f"no tensor of {path} fits this model (the file has e.g. {sorted(src)[:3]}, the model "
                         f"{sorted(dst)[:3]}): it holds weights of another architecture; start from weights of this one")
    problems = len(report.skipped) + len(report.missing) + len(report.unexpected)
    if strict and problems:
        raise StageError(f"cannot start strictly from {path}: {problems} tensors do not load beyond the head "
                         f"`{head}`: {'; '.join(report.problems())}; use weights of the same architecture, or set "
                         "train.finetune.strict=false to load what fits")
    model.load_state_dict({**dst, **loaded})
    return report


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
