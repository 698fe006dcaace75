"""Per-layer sensitivity of static INT8 quantization, and the search that keeps the worst layers in float.

Both the float model and its QDQ twin are run on the same calibration samples with every
intermediate tensor exposed (onnxruntime.quantization.qdq_loss_debug). For each node of the float
graph we compare, against the float model's tensors, the inputs the quantized node actually consumes
(after QuantizeLinear/DequantizeLinear) and the output it hands on (after its own QDQ pair, if any:
the quantizer may also drop a Relu into that pair), as signal-to-quantization-noise ratios in dB. The node's sensitivity is the SQNR it loses between its worst input and its output:
the error that quantizing *this* node adds, not the error piled up before it (which would always
blame the last layer). A layer whose input has a huge outlier range shows up here even when the
tensor-wide SQNR of that input looks fine, because its small channels are rounded to zero and the
node's output collapses.

The search excludes the most sensitive node (``nodes_to_exclude``), re-quantizes, judges the result
on the validation split, and goes on down the ranking until the budget is met or nothing is left.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from stages.common import scratch, write_json, write_text

if TYPE_CHECKING:
    from stages.quantize.variants import Context

log = logging.getLogger(__name__)


def sqnr_db(reference: np.ndarray, actual: np.ndarray) -> float:
    """20·log10(‖reference‖ / ‖reference − actual‖), capped at 200 dB for identical tensors."""
    ref = reference.astype(np.float64).ravel()
    noise = np.linalg.norm(ref - actual.astype(np.float64).ravel())
    signal = np.linalg.norm(ref)
    if noise <= 1e-30:
        return 200.0
    return float(min(200.0, 20.0 * math.log10(max(signal, 1e-30) / noise)))


def _activations(model: Path, feeds: dict[str, np.ndarray], workdir: Path, tag: str,
                 batch_size: int = 64) -> dict[str, np.ndarray]:
    from onnxruntime.quantization.qdq_loss_debug import collect_activations, modify_model_output_intermediate_tensors

    from stages.quantize.variants import CalibrationReader

    augmented = workdir / f"{tag}.augmented.onnx"
    modify_model_output_intermediate_tensors(str(model), str(augmented))
    acts = collect_activations(str(augmented), CalibrationReader(feeds, batch_size))
    return {k: np.concatenate([a.ravel() for a in v]) for k, v in acts.items()}


def table(float_model: Path, qdq_model: Path, feeds: dict[str, np.ndarray], batch_size: int = 64) -> list[dict]:
    """One row per float-graph node that the QDQ model quantizes, most sensitive first, measured on
    ``feeds`` (input name -> calibration samples as the float model takes them), ``batch_size`` at a time
    (a graph with a fixed batch dimension takes exactly that many)."""
    import onnx
    from onnxruntime.quantization.qdq_loss_debug import compute_activation_error, create_activation_matching

    with scratch("quantize") as tmp:
        fl = _activations(float_model, feeds, Path(tmp), "float", batch_size)
        qd = _activations(qdq_model, feeds, Path(tmp), "qdq", batch_size)
    matching = create_activation_matching({k: [v] for k, v in qd.items()}, {k: [v] for k, v in fl.items()})
    # ONNX Runtime's own per-tensor numbers: qdq_err is the SQNR of the QDQ pair alone (pre vs post).
    errors = compute_activation_error(matching)

    def consumed(name: str) -> np.ndarray | None:  # what a quantized consumer reads: the dequantized tensor
        return matching[name]["post_qdq"][0] if name in matching else qd.get(name)

    graph = onnx.load(str(float_model), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    producers = {o: n.name for n in graph.node for o in n.output if n.name}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def seen(name: str) -> str | None:
        """``name`` if both models expose it, else the first such tensor down a single-consumer chain
        (the quantizer fuses e.g. Gemm+Relu, so the Gemm's own output no longer exists there)."""
        for _ in range(8):
            if name in fl and consumed(name) is not None:
                return name
            nxt = consumers.get(name, [])
            if len(nxt) != 1 or not nxt[0].output:
                return None
            name = nxt[0].output[0]
        return None

    rows = []
    for node in graph.node:
        ins = [i for i in node.input if i and i not in inits and i in fl and consumed(i) is not None]
        outs = [seen(o) for o in node.output]
        outs = [o for o in outs if o is not None]
        if not node.name or not ins or not outs:
            continue
        quantized_inputs = [i for i in ins if i in matching]
        if not quantized_inputs:
            continue  # this node reads float tensors: excluding it would change nothing
        in_sqnr = {i: sqnr_db(fl[i], consumed(i)) for i in ins}
        worst = min(quantized_inputs, key=in_sqnr.get)
        out_sqnr = min(sqnr_db(fl[o], consumed(o)) for o in outs)
        rows.append({
            "node": node.name, "op_type": node.op_type, "inputs": quantized_inputs, "output": outs[0],
            # Keeping a node in float drops the QDQ pair on its input only if the producer does not
            # quantize its own output (ONNX Runtime's QDQ Conv/Gemm/MatMul do): exclude both.
            "exclude": [node.name] + ([producers[worst]] if producers.get(worst) else []),
            "input_sqnr_db": round(in_sqnr[worst], 3), "output_sqnr_db": round(out_sqnr, 3),
            "sqnr_lost_db": round(min(in_sqnr.values()) - out_sqnr, 3),
            "input_qdq_sqnr_db": round(min(errors[i]["qdq_err"] for i in quantized_inputs), 3),
        })
    rows.sort(key=lambda r: (-r["sqnr_lost_db"], r["output_sqnr_db"]))
    for rank, r in enumerate(rows, start=1):
        r["rank"] = rank
    return rows


def markdown(rows: list[dict], excluded: list[str], attempts: list[dict]) -> str:
    lines = ["# int8-static per-layer sensitivity\n",
             "SQNR in dB against the float model on calibration samples; `lost` = worst input SQNR − output SQNR "
             "(the error this node's quantization adds). Most sensitive first. `input QDQ SQNR` is ONNX Runtime's "
             "qdq_err of the input's QDQ pair alone; it reads low where the quantizer folded a Relu into that pair.\n",
             "| rank | node | op | input SQNR | output SQNR | lost | input QDQ SQNR | kept in float |",
             "|---:|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['rank']} | `{r['node']}` | {r['op_type']} | {r['input_sqnr_db']:.1f} | {r['output_sqnr_db']:.1f} | "
                     f"{r['sqnr_lost_db']:.1f} | {r['input_qdq_sqnr_db']:.1f} | {'yes' if r['node'] in excluded else ''} |")
    lines += ["", "## Attempts (validation split)\n", "| excluded nodes | delta | within budget |", "|---|---:|---|"]
    for a in attempts:
        lines.append(f"| {len(a['excluded_nodes'])} | {a['delta']:+.3f} {a['unit']} | {a['within_budget']} |")
    return "\n".join(lines) + "\n"


def search(pre: Path, dst: Path, ctx: "Context", quantize: Callable[[Path, Path, "Context", list[str]], None]
           ) -> tuple[list[str], list[dict]]:
    """Exclude nodes in order of sensitivity until the validation verdict is within budget.
    ``dst`` holds the fully quantized model on entry and the last attempt on return."""
    from stages.quantize.variants import first, samples

    cfg = ctx.config
    feeds = first(ctx.calibration, cfg.sensitivity_samples)
    rows = table(pre, dst, feeds, ctx.feed_batch)
    limit = cfg.max_excluded_nodes or len(rows) * 2
    excluded: list[str] = []
    attempts: list[dict] = []
    for row in rows:
        added = [n for n in row["exclude"] if n not in excluded]
        if not added:
            continue
        if len(excluded) + len(added) > limit:
            break
        excluded += added
        quantize(pre, dst, ctx, excluded)
        v = ctx.judge_val(dst)
        attempts.append({"excluded_nodes": list(excluded), "delta": v.delta, "unit": v.unit, "within_budget": v.within})
        log.info("int8-static with %d node(s) in float (latest %s, %s): %+.3f %s on validation%s", len(excluded),
                 row["node"], row["op_type"], v.delta, v.unit, "" if v.within else ", still over budget")
        if v.within:
            break
    if not attempts or not attempts[-1]["within_budget"]:
        log.warning("int8-static: still over budget with %d of %d quantized nodes in float%s", len(excluded), len(rows),
                    f" (max_excluded_nodes={cfg.max_excluded_nodes})" if cfg.max_excluded_nodes else "")
    json_path, md_path = ctx.artifact_names.get("sensitivity_json"), ctx.artifact_names.get("sensitivity_md")
    if json_path is not None:
        write_json(json_path, {"metric": "SQNR dB vs float on calibration samples", "samples": samples(feeds),
                               "layers": rows, "excluded_nodes": excluded, "attempts": attempts})
    if md_path is not None:
        write_text(md_path, markdown(rows, excluded, attempts))
    return excluded, attempts
