"""Reusable torch -> ONNX conversion: build what gets exported, write it, check it.

Not a stage: export uses it for the trained model and its parts, quantize for models it changes in
PyTorch (the pruned variant), benchmark to time PyTorch on the same work as the file. Feeding an
exported file (what its metadata says it takes) belongs to ``stages.onnx_model``.

- ``InGraph`` wraps a model so the file takes the raw input the user has (say uint8 pixels) and does
  the cast and normalization itself (``onnx_model.Preprocessing``), optionally adding a softmax output
  beside the logits.
- ``export_checked`` tries the ``torch.export``-based exporter, then the legacy one, and keeps the
  first file whose outputs ONNX Runtime reproduces; ``validate`` compares names, then shapes, then
  values at several batch sizes (one never used at export time, so a baked-in batch axis shows) and
  returns every mismatch at once with its max absolute difference.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torch import nn

from stages.common import StageError
from stages.dataset import along_axis1
from stages.predictors import OrtPredictor

if TYPE_CHECKING:
    import models
    from stages.onnx_model import Preprocessing

log = logging.getLogger(__name__)

EXPORTERS = ("dynamo", "legacy")
# The batch size of the example the exporters trace with. torch.export specializes sizes 0 and 1, so
# a batch of 1 would pin the axis; validation must also run at a size other than this one.
EXAMPLE_BATCH = 2


class ValidationError(StageError):
    """An exported file does not reproduce PyTorch; the message lists every mismatch."""


# ---------------------------------------------------------------- preprocessing in the graph

class InGraph(nn.Module):
    """``model`` with the file's preprocessing (cast + normalization) in front and an optional softmax behind.

    Only preprocessing that is ``applied_in_graph`` and has statistics goes in; otherwise (``None``,
    outside the graph, or none at all) the input passes through unchanged. With ``softmax`` the
    module returns ``(logits, softmax(logits))``.
    """

    def __init__(self, model: nn.Module, preprocessing: "Preprocessing | None" = None, softmax: bool = False,
                 input_ndim: int = 4):
        super().__init__()
        self.model = model
        self.preprocess = (preprocessing is not None and preprocessing.applied_in_graph
                           and preprocessing.mean is not None)
        self.softmax = softmax
        if self.preprocess:
            # Buffers, not constants: they travel with .to(device) and show up as initializers.
            self.register_buffer("mean", torch.from_numpy(along_axis1(preprocessing.mean, input_ndim).copy()))
            self.register_buffer("std", torch.from_numpy(along_axis1(preprocessing.std, input_ndim).copy()))

    def forward(self, x):
        if self.preprocess:
            x = (x.to(torch.float32) - self.mean) / self.std
        out = self.model(x)
        if self.softmax:
            return out, torch.softmax(out, dim=1)
        return out


# ---------------------------------------------------------------- export and validation

def torch_example(x: np.ndarray):
    """``EXAMPLE_BATCH`` real samples (repeated if fewer), in the dtype the file will take."""
    return torch.from_numpy(np.ascontiguousarray(np.resize(x, (EXAMPLE_BATCH, *x.shape[1:]))))


def export_onnx(model, example, path: Path, spec: "models.ExportSpec", opset: int, exporter: str) -> None:
    """Write ``model`` to ``path`` as ONNX with a dynamic batch axis, weights inside the file.

    ``spec`` needs ``input_name``, ``output_names`` and ``dynamic_batch`` (an ExportSpec, or an
    ExportPart, which is always batch-dynamic).
    """
    outputs = list(spec.output_names)
    dynamic = getattr(spec, "dynamic_batch", True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice, tracer warnings
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=1 << 20)
            torch.onnx.export(model, (example,), str(path), dynamo=True, external_data=False,
                              input_names=[spec.input_name], output_names=outputs, opset_version=opset,
                              dynamic_shapes=({0: batch},) if dynamic else None, verbose=False)
        elif exporter == "legacy":
            axes = {name: {0: "batch"} for name in [spec.input_name, *outputs]} if dynamic else None
            torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=[spec.input_name],
                              output_names=outputs, opset_version=opset, dynamic_axes=axes, do_constant_folding=True)
        else:
            raise ValueError(f"unknown exporter {exporter!r}; choose one of {EXPORTERS}")


def compare_outputs(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray], atol: float, rtol: float,
                    where: str) -> tuple[list[str], float]:
    """Names, then shapes, then values. Returns (every mismatch as a sentence, max abs diff seen)."""
    problems, worst = [], 0.0
    missing = [n for n in expected if n not in actual]
    extra = [n for n in actual if n not in expected]
    if missing or extra:
        problems.append(f"{where}: output names differ: missing {missing}, unexpected {extra}")
    for name in expected:
        if name not in actual:
            continue
        e, a = expected[name], actual[name]
        if e.shape != a.shape:
            problems.append(f"{where}: output '{name}' has shape {list(a.shape)}, PyTorch gives {list(e.shape)}")
            continue
        diff = float(np.max(np.abs(e.astype(np.float64) - a.astype(np.float64)))) if e.size else 0.0
        worst = max(worst, diff)
        if not np.allclose(a, e, atol=atol, rtol=rtol):
            problems.append(f"{where}: output '{name}' max |diff| {diff:.3e} exceeds atol {atol:g} + rtol {rtol:g}")
    return problems, worst


def batch_axis_problems(onnx_path: Path, spec: "models.ExportSpec") -> list[str]:
    """A dynamic batch axis must be symbolic in the graph's declared inputs and outputs."""
    import onnx

    if not getattr(spec, "dynamic_batch", True):
        return []
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    problems = []
    for kind, values in (("input", graph.input), ("output", graph.output)):
        for v in values:
            dims = v.type.tensor_type.shape.dim
            if dims and dims[0].HasField("dim_value"):
                problems.append(f"{kind} '{v.name}': batch axis is fixed to {dims[0].dim_value}, expected a dynamic axis")
    return problems


def validate(onnx_path: Path, model, x: np.ndarray, spec: "models.ExportSpec", batch_sizes: tuple[int, ...] = (1, 2, 37),
             atol: float = 1e-4, rtol: float = 1e-3) -> tuple[list[str], dict]:
    """Compare ONNX Runtime (CPU) with PyTorch (``model`` in eval mode) on real inputs ``x`` (exactly as
    the file takes them, dtype included) at each batch size. -> (every problem, per-batch report)."""
    problems = batch_axis_problems(onnx_path, spec)
    if getattr(spec, "dynamic_batch", True) and all(bs == EXAMPLE_BATCH for bs in batch_sizes):
        problems.append(f"only batch size {EXAMPLE_BATCH} (the export example's) was checked; add another size "
                        "so a batch axis baked in at export time shows")
    session = OrtPredictor(onnx_path, device="cpu")
    report = {}
    names = list(spec.output_names)
    for bs in batch_sizes:
        xb = np.ascontiguousarray(np.resize(x, (bs, *x.shape[1:])))  # real samples, repeated if the split is short
        with torch.inference_mode():
            out = model(torch.from_numpy(xb))
        out = out if isinstance(out, (tuple, list)) else (out,)
        if len(out) != len(names):
            problems.append(f"batch {bs}: PyTorch returns {len(out)} outputs but the export spec names {len(names)}: {names}")
            continue
        expected = {name: t.numpy() for name, t in zip(names, out)}
        try:
            actual = session.run({spec.input_name: xb})
        except Exception as e:  # e.g. a batch axis that was baked in as a constant
            problems.append(f"batch {bs}: ONNX Runtime failed: {str(e).splitlines()[0][:300]}")
            continue
        found, worst = compare_outputs(expected, actual, atol, rtol, f"batch {bs}")
        problems += found
        report[str(bs)] = {"max_abs_diff": worst, "ok": not found}
    return problems, report


def export_checked(model, x: np.ndarray, path: Path, spec: "models.ExportSpec", opset: int = 18,
                   exporter: str = "auto", batch_sizes: tuple[int, ...] = (1, 2, 37), atol: float = 1e-4,
                   rtol: float = 1e-3, what: str = "model") -> dict:
    """Export ``model`` to ``path`` with the first exporter (``auto``: dynamo, then legacy) whose file
    ONNX Runtime reproduces on ``x``; raise ValidationError naming every problem of every exporter.

    -> {"exporter", "max_abs_diff", "rejected": {exporter: why}, "attempts": [...]}. ``path`` should
    be a temporary name (``common.atomic_path``): on failure it holds a rejected file.
    """
    model = model.eval()
    order = EXPORTERS if exporter == "auto" else (exporter,)
    attempts: list[dict] = []
    for name in order:
        try:
            export_onnx(model, torch_example(x), path, spec, opset, name)
            problems, report = validate(path, model, x, spec, batch_sizes, atol, rtol)
        except Exception as e:
            problems, report = [f"export failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"], {}
        attempts.append({"exporter": name, "ok": not problems, "problems": problems, "batches": report})
        if not problems:
            break
        log.warning("%s: %s exporter rejected: %s", what, name, "; ".join(problems))
    else:
        raise ValidationError(f"ONNX export of {what} does not reproduce PyTorch:\n  "
                              + "\n  ".join(f"[{a['exporter']}] {p}" for a in attempts for p in a["problems"]))
    if any(p.name.endswith(".data") for p in Path(path).parent.glob(Path(path).name + "*")):
        raise StageError(f"the exporter wrote external weight data for {what}; expected a single self-contained file")
    accepted = attempts[-1]
    rejected = {a["exporter"]: "; ".join(a["problems"]) for a in attempts[:-1]}
    for name in order[len(attempts):]:
        rejected[name] = f"not tried: the {accepted['exporter']} exporter passed first"
    return {"exporter": accepted["exporter"], "rejected": rejected, "attempts": attempts,
            "max_abs_diff": max((b["max_abs_diff"] for b in accepted["batches"].values()), default=0.0)}


def part_inputs(shape: Sequence[int], n: int, seed: int = 0) -> np.ndarray:
    """Inputs for a part whose input is not the model's (a VAE decoder's latent): draws from N(0, 1),
    the prior a user samples from, seeded."""
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)
