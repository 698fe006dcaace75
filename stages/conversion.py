"""Reusable torch -> ONNX conversion: write a file, then check it against PyTorch.

Not a stage: export uses it for the trained model, quantize for models it changes in PyTorch (the
pruned variant). ``validate`` compares ONNX Runtime with PyTorch on real inputs at several batch
sizes, output names first, then shapes, then values, and returns every mismatch at once.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from stages.predictors import OrtPredictor

if TYPE_CHECKING:
    import models


def export_onnx(model, example, path: Path, spec: "models.ExportSpec", opset: int, exporter: str) -> None:
    """Write ``model`` to ``path`` as ONNX with a dynamic batch axis, weights inside the file."""
    import torch

    outputs = list(spec.output_names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice, tracer warnings
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=1 << 20)
            torch.onnx.export(model, (example,), str(path), dynamo=True, external_data=False,
                              input_names=[spec.input_name], output_names=outputs, opset_version=opset,
                              dynamic_shapes=({0: batch},) if spec.dynamic_batch else None, verbose=False)
        else:
            axes = {name: {0: "batch"} for name in [spec.input_name, *outputs]} if spec.dynamic_batch else None
            torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=[spec.input_name],
                              output_names=outputs, opset_version=opset, dynamic_axes=axes, do_constant_folding=True)


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


def validate(onnx_path: Path, model, x: np.ndarray, spec: "models.ExportSpec", batch_sizes: tuple[int, ...] = (1, 2, 37),
             atol: float = 1e-4, rtol: float = 1e-3) -> tuple[list[str], dict]:
    """Compare ONNX Runtime (CPU) with PyTorch on real inputs at each checked batch size."""
    import torch

    session = OrtPredictor(onnx_path, device="cpu")
    problems, report = [], {}
    for bs in batch_sizes:
        xb = np.resize(x, (bs, *x.shape[1:])).astype(np.float32)  # real samples, repeated if the split is short
        with torch.inference_mode():
            out = model(torch.from_numpy(xb))
        out = out if isinstance(out, (tuple, list)) else (out,)
        expected = {name: t.numpy() for name, t in zip(spec.output_names, out)}
        try:
            actual = session.run({spec.input_name: xb})
        except Exception as e:  # e.g. a batch axis that was baked in as a constant
            problems.append(f"batch {bs}: ONNX Runtime failed: {str(e).splitlines()[0][:300]}")
            continue
        found, worst = compare_outputs(expected, actual, atol, rtol, f"batch {bs}")
        problems += found
        report[str(bs)] = {"max_abs_diff": worst, "ok": not found}
    return problems, report


def torch_example(x: np.ndarray):
    import torch

    # Batch 2: torch.export specializes sizes 0 and 1, so a batch of 1 would pin the axis.
    return torch.from_numpy(np.resize(x, (2, *x.shape[1:])).astype(np.float32))
