"""The table of named variants and the makers behind it.

Each row says what a variant is, how it is made from the exported fp32 file, when it applies (a
predicate that returns the reason it does not) and whether it needs calibration data. quantize,
benchmark, register and the tests all go by these names, never by position.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import numpy as np

from stages.common import scratch

if TYPE_CHECKING:
    import onnx

    from stages.quantize import Config

log = logging.getLogger(__name__)


@dataclass
class Context:
    """What a maker or a predicate may use besides the fp32 file."""

    config: "Config"
    task: str
    family: str
    fp32: "onnx.ModelProto"  # graph only (predicates look at it)
    calibration: dict[str, np.ndarray]  # training samples as the fp32 file takes them, by input name (OnnxModel.feed)
    judge_val: Callable[[Path], Any]  # file -> judge.Verdict on the validation split, against fp32
    checkpoint: Path | None = None
    data: Any = None  # stages.dataset.Data
    artifacts_dir: Path | None = None  # where makers write their evidence (sensitivity tables)
    artifact_names: dict[str, Path] = field(default_factory=dict)
    feed_batch: int = 64  # samples per session call; a graph with a fixed batch dimension takes exactly that many


def samples(feeds: Mapping[str, np.ndarray]) -> int:
    """How many samples a dict of feeds holds (the length of its batch axis)."""
    return len(next(iter(feeds.values())))


def first(feeds: Mapping[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """The first ``n`` samples of every input."""
    return {name: x[:n] for name, x in feeds.items()}


class CalibrationReader:
    """ONNX Runtime's CalibrationDataReader over feeds (input name -> array, as ``OnnxModel.feed`` gives
    them), in mini-batches of every input at once (the batch axis is dynamic)."""

    def __init__(self, feeds: Mapping[str, np.ndarray], batch_size: int = 64):
        self.batches = iter([{name: x[i:i + batch_size] for name, x in feeds.items()}
                             for i in range(0, samples(feeds), batch_size)])

    def get_next(self):
        return next(self.batches, None)

    def __iter__(self):
        return iter(self.get_next, None)


QUANTIZER_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear (an `axis`) need ai.onnx 13


def modernized(model: "onnx.ModelProto") -> "onnx.ModelProto":
    """The same graph in a form ONNX Runtime's quantizers handle, for files the pipeline did not export:
    initializers that an IR < 4 file also lists as graph inputs are dropped from the inputs (the
    calibrator would ask for them as inputs), and an ai.onnx opset below 13 is converted up (the
    quantizer would otherwise write per-channel DequantizeLinear nodes with an `axis` that opset 11
    lacks, an invalid model). Our own exports come back unchanged."""
    import onnx
    from onnx import version_converter

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), QUANTIZER_OPSET)
    initializers = {t.name for t in model.graph.initializer}
    listed = [v for v in model.graph.input if v.name in initializers]
    if opset >= QUANTIZER_OPSET and not listed:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    kept = [v for v in out.graph.input if v.name not in initializers]
    del out.graph.input[:]
    out.graph.input.extend(kept)
    out.ir_version = max(out.ir_version, 4)
    if opset < QUANTIZER_OPSET:
        out = version_converter.convert_version(out, QUANTIZER_OPSET)
        out.ir_version = max(out.ir_version, 7)  # opset 13's IR
    return out


def maker_source(fp32: Path, scratch: Path) -> tuple[Path, "onnx.ModelProto"]:
    """The file the makers start from, and its graph: the fp32 file itself, or (an imported file with an
    old opset or IR) its ``modernized`` copy under ``scratch``. Every variant is still checked and
    judged against the fp32 file as it is."""
    import onnx

    original = onnx.load(str(fp32))
    modern = modernized(original)
    if modern is original:
        return fp32, original
    path = Path(scratch) / "fp32.modernized.onnx"
    onnx.save(modern, str(path))
    log.info("%s: opset/IR modernized for the quantizers (a copy; the fp32 file is unchanged)", fp32.name)
    return path, modern


@contextlib.contextmanager
def preprocessed(src: Path) -> Iterator[Path]:
    """Shape inference and graph cleanup first, as ONNX Runtime's quantization guide asks. It also
    drops the exporter's intermediate shape annotations, which the quantizer's own shape inference
    otherwise trips over (seen with the torch.export-based exporter: "Inferred shape and existing
    shape differ")."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with scratch("quantize") as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(src), str(pre))
        yield pre


# ---------------------------------------------------------------- predicates (None: applies)

def always(ctx: Context) -> str | None:
    return None


def int4_applicable(ctx: Context) -> str | None:
    eligible = int4_eligible_nodes(ctx.fp32)
    if not eligible:
        return ("no MatMul/Gemm with a constant 2-D weight (the weight-only INT4 MatMulNBits quantizer only "
                "rewrites those); this model's compute is elsewhere (e.g. Conv)")
    return None


def pruned_applicable(ctx: Context) -> str | None:
    from stages.quantize import prune

    if ctx.task not in ("classification", "regression"):
        return f"pruning fine-tunes with a classification or regression loss; this model's task is {ctx.task}"
    if ctx.checkpoint is None or not Path(ctx.checkpoint).is_file():
        return "no checkpoint.pt in the run directory to prune (pruning works on the PyTorch model)"
    from stages import checkpoint

    model, _ = checkpoint.load(ctx.checkpoint)
    return prune.why_not(model, ctx.config.prune_ratio)


# ---------------------------------------------------------------- makers

def make_optimized(src: Path, dst: Path, ctx: Context) -> dict:
    """ONNX Runtime's offline graph optimizations, saved. Level `basic` writes only standard ONNX ops
    (constant folding, Conv+BN/Add/Mul fusion, redundant nodes removed) and stays portable to any EP;
    `extended` adds com.microsoft fusions (FusedConv, FusedGemm, ...) that CPU and CUDA both load, but
    an op a provider lacks falls back to the CPU there. `all` (layout rewrites such as NCHWc) is
    hardware-specific and is refused here: ONNX Runtime's docs say not to save it for other machines."""
    import onnx
    import onnxruntime as ort

    level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
             "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}[ctx.config.optimization_level]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.optimized_model_filepath = str(dst)
    opts.log_severity_level = 3
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
    graph = onnx.load(str(dst), load_external_data=False)
    domains = sorted({n.domain or "ai.onnx" for n in graph.graph.node})
    return {"optimization_level": ctx.config.optimization_level, "op_domains": domains,
            "nodes": len(graph.graph.node), "fp32_nodes": len(ctx.fp32.graph.node)}


def make_int8_dynamic(src: Path, dst: Path, ctx: Context) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with preprocessed(src) as pre:
        quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8, per_channel=ctx.config.per_channel)
    return {"weight_type": "QInt8", "per_channel": ctx.config.per_channel}


def static_quantize(pre: Path, dst: Path, ctx: Context, exclude: list[str]) -> None:
    """One static INT8 quantization of the preprocessed float model, with ``exclude`` kept in float."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    cfg = ctx.config
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[cfg.calibration_method]
    qtype = {"quint8": QuantType.QUInt8, "qint8": QuantType.QInt8}
    quantize_static(str(pre), str(dst), CalibrationReader(ctx.calibration, ctx.feed_batch),
                    quant_format=QuantFormat.QDQ if cfg.static_format == "qdq" else QuantFormat.QOperator,
                    per_channel=cfg.per_channel, reduce_range=cfg.reduce_range,
                    activation_type=qtype[cfg.activation_type], weight_type=QuantType.QInt8,
                    calibrate_method=method, nodes_to_exclude=list(exclude),
                    extra_options={"CalibPercentile": cfg.calibration_percentile})


def make_int8_static(src: Path, dst: Path, ctx: Context) -> dict:
    """Static INT8, accuracy-aware: quantize everything; if the validation split misses the budget,
    rank layers by measured sensitivity, keep the worst in float and retry (stages/quantize/sensitivity.py)."""
    from stages.quantize import sensitivity

    cfg = ctx.config
    info = {"format": cfg.static_format.upper(), "per_channel": cfg.per_channel, "activation_type": cfg.activation_type,
            "reduce_range": cfg.reduce_range, "calibration_method": cfg.calibration_method,
            "calibration_samples": samples(ctx.calibration)}
    with preprocessed(src) as pre:
        static_quantize(pre, dst, ctx, [])
        attempts = [{"excluded_nodes": [], **_verdict_row(ctx.judge_val(dst))}]
        if attempts[0]["within_budget"] or not cfg.sensitivity:
            return {**info, "excluded_nodes": [], "attempts": attempts}
        log.info("int8-static misses the budget on the validation split (%+.3f %s); measuring per-layer sensitivity",
                 attempts[0]["delta"], attempts[0]["unit"])
        excluded, more = sensitivity.search(pre, dst, ctx, static_quantize)
    attempts += more
    return {**info, "excluded_nodes": excluded, "attempts": attempts}


def _verdict_row(v) -> dict:
    return {"delta": v.delta, "unit": v.unit, "within_budget": v.within}


# fp16 would lose range or precision in these: exponentials and logs overflow past 65504, reductions
# and normalizations accumulate many terms. They stay float32 (a Cast pair around each).
FP16_UNSAFE_OPS = ("Exp", "Log", "Pow", "Softmax", "LogSoftmax", "ReduceMean", "ReduceSum", "ReduceSumSquare",
                   "ReduceL2", "LayerNormalization", "InstanceNormalization", "Range", "CumSum", "TopK")


def make_fp16(src: Path, dst: Path, ctx: Context) -> dict:
    """float16 weights and compute with float32 inputs and outputs (ONNX Runtime's converter,
    onnxruntime.transformers.float16, so no extra dependency)."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST
    from onnxruntime.transformers.onnx_model import OnnxModel

    blocked = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(FP16_UNSAFE_OPS))
    model = OnnxModel(onnx.load(str(src)))
    model.convert_float_to_float16(keep_io_types=True, op_block_list=blocked)
    model.topological_sort()  # the converter appends the input Casts last; onnx.checker wants order
    onnx.save(model.model, str(dst))
    return {"keep_io_types": True, "blocked_ops_present": sorted({n.op_type for n in ctx.fp32.graph.node} & set(blocked))}


def int4_eligible_nodes(model: "onnx.ModelProto") -> list[str]:
    """MatMul nodes (and plain Gemm nodes we rewrite to MatMul + Add) whose weight is a constant 2-D
    initializer: what MatMulNBits can take."""
    inits = {i.name: i for i in model.graph.initializer}
    found = []
    for n in model.graph.node:
        if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits and len(inits[n.input[1]].dims) == 2:
            found.append(n.name)
        elif n.op_type == "Gemm" and _plain_gemm(n, inits):
            found.append(n.name)
    return found


def _plain_gemm(node, inits) -> bool:
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return (attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
            and len(node.input) > 1 and node.input[1] in inits and len(inits[node.input[1]].dims) == 2)


def gemm_to_matmul(model: "onnx.ModelProto") -> int:
    """Rewrite plain Gemm(x, W[, b]) into MatMul(x, W^T) [+ Add b] in place; returns how many."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    nodes, count = [], 0
    for n in model.graph.node:
        if n.op_type != "Gemm" or not _plain_gemm(n, inits):
            nodes.append(n)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        w = numpy_helper.to_array(inits[n.input[1]])
        w_name = f"{n.input[1]}_for_matmul"
        model.graph.initializer.append(numpy_helper.from_array(w.T.copy() if attrs.get("transB", 0) else w, w_name))
        has_bias = len(n.input) > 2 and n.input[2]
        mm_out = f"{n.output[0]}_matmul" if has_bias else n.output[0]
        nodes.append(helper.make_node("MatMul", [n.input[0], w_name], [mm_out], name=n.name))
        if has_bias:
            nodes.append(helper.make_node("Add", [mm_out, n.input[2]], [n.output[0]], name=f"{n.name}_bias"))
        count += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return count


def make_int4_weight(src: Path, dst: Path, ctx: Context) -> dict:
    """Weight-only INT4 (symmetric, blocks of ``int4_block_size`` along K) for MatMul weights via
    ONNX Runtime's MatMulNBits; activations stay float. Gemm layers are first rewritten to MatMul."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src))
    rewritten = gemm_to_matmul(model)
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=ctx.config.int4_block_size, is_symmetric=True)
    quantizer.process()
    out = quantizer.model.model
    quantized = sum(n.op_type == "MatMulNBits" for n in out.graph.node)
    if not quantized:
        raise RuntimeError("MatMulNBitsQuantizer quantized no MatMul")
    onnx.save(out, str(dst))
    return {"block_size": ctx.config.int4_block_size, "matmul_nbits_nodes": quantized, "gemm_rewritten": rewritten}


def make_pruned(src: Path, dst: Path, ctx: Context) -> dict:
    from stages.quantize import prune

    return prune.make(src, dst, ctx)


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    make: Callable[[Path, Path, Context], dict] | None  # None: the exported file itself
    applicable: Callable[[Context], str | None] = always  # returns why it does not apply, or None
    needs_calibration: bool = False


VARIANTS: dict[str, Variant] = {v.name: v for v in [
    Variant("fp32", "the exported model, float32", None),
    Variant("optimized", "ONNX Runtime offline graph optimizations saved to a file (portable level)", make_optimized),
    Variant("int8-dynamic", "INT8 weights, activations quantized at run time (quantize_dynamic)", make_int8_dynamic),
    Variant("int8-static", "INT8 QDQ, per-channel weights, activation ranges calibrated on training samples; "
            "sensitive layers kept in float when the budget is missed", make_int8_static, needs_calibration=True),
    Variant("fp16", "float16 weights and compute, float32 inputs/outputs, unsafe ops kept float32", make_fp16),
    Variant("int4-weight", "weight-only INT4 MatMul (MatMulNBits, block-wise symmetric)", make_int4_weight,
            int4_applicable),
    Variant("pruned", "structured L1-norm channel pruning of the PyTorch model, fine-tuned, re-exported",
            make_pruned, pruned_applicable),
]}
