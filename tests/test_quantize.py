"""quantize: the variant table drives these tests; budgets, the sensitivity loop and pruning on real models.

The sensitivity test uses a model BUILT to need the loop: a trained digits MLP with one extra layer
that passes the hidden features through unchanged and adds one constant channel of 10,000. The
classifier ignores that channel (zero weights), so fp32 is exactly the MLP. Static INT8 gives the
tensor one per-tensor uint8 scale (about 10,000 / 255 ≈ 39), so every real feature (0..~10) rounds to
zero and accuracy falls to chance, unless the layer reading that tensor stays in float.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from stages.contract import NullTracker
from stages import conversion, dataset, quantize, register
from stages.common import StageError
from stages.predictors import OrtPredictor
from stages.quantize import prune, variants

OUTLIER = 1e4


def _report(rundir) -> dict:
    return json.loads(rundir.variants.read_text())


# ---------------------------------------------------------------- the table drives the parametrization

@pytest.mark.parametrize("name", list(quantize.VARIANTS))
def test_each_variant_builds_validates_and_stays_in_a_loose_budget_or_says_why(quantized, name):
    report = _report(quantized)
    v = report["variants"][name]
    if v["status"] == "not-applicable":
        assert v["reason"] and not v["eligible"]
        return
    assert v["ok"] and v["status"] in ("ok", "over-budget"), v
    path = quantized.variant(name)
    fp32 = OrtPredictor(quantized.onnx)
    p = OrtPredictor(path)
    assert p.output_names == fp32.output_names and p.inputs[0].type == fp32.inputs[0].type
    # loose: the tiny under-trained CNN may lose a little, never collapse
    assert v["delta_points"] > -5.0, v
    assert v["delta_points"] == pytest.approx((v["accuracy"] - report["fp32_accuracy"]) * 100)
    assert v["eligible"] == (-v["delta_points"] <= report["accuracy_budget_points"] + 1e-9)
    props = {x.key: x.value for x in onnx.load(str(path), load_external_data=False).metadata_props}
    assert props["variant"] == name and "labels" in props
    assert float(props["metrics.test_accuracy"]) == pytest.approx(v["accuracy"], abs=1e-6)
    if quantize.VARIANTS[name].needs_calibration:
        assert json.loads(props["quantize.calibration"]) == {"method": "minmax", "samples": 64}
        assert json.loads(props["quantize.excluded_nodes"]) == v["excluded_nodes"]


def test_the_tiny_cnn_gets_every_variant_and_int8_static_is_qdq(quantized):
    variants_ = _report(quantized)["variants"]
    assert list(variants_) == list(quantize.VARIANTS)
    assert not [n for n, v in variants_.items() if v["status"] == "failed"], variants_
    static = onnx.load(str(quantized.variant("int8-static")))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in static.graph.node}
    assert variants_["optimized"]["optimization_level"] == "basic"
    for name in ("int8-static", "int8-dynamic", "int4-weight", "pruned"):
        assert variants_[name]["size_bytes"] < variants_["fp32"]["size_bytes"], name


def test_int4_is_not_applicable_without_a_matmul_and_says_why():
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 1, 4, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    w = onnx.numpy_helper.from_array(np.ones((2, 1, 3, 3), np.float32), "w")
    graph = onnx.helper.make_graph([onnx.helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "g", [x], [y], [w])
    ctx = variants.Context(config=quantize.Config(), task="classification", family="cnn",
                           fp32=onnx.helper.make_model(graph), calibration={"x": np.zeros((1, 1, 4, 4), np.float32)},
                           judge_val=None)
    reason = quantize.VARIANTS["int4-weight"].applicable(ctx)
    assert reason and "MatMul" in reason


def test_pruning_refuses_a_branching_model():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.b(x + self.a(x))

    assert "plain chain" in prune.why_not(Residual(), 0.5)


# ---------------------------------------------------------------- pruning

def test_pruned_variant_has_fewer_channels_and_parameters_and_matches_its_torch_model(quantized):
    v = _report(quantized)["variants"]["pruned"]
    assert v["parameters_after"] < v["parameters_before"]
    assert v["channels"] == {"features.0": "8->6", "features.4": "16->12", "head.2": "32->24"}
    assert v["max_abs_diff_vs_pruned_torch"] < 1e-3  # validated against the pruned PyTorch model
    conv_out = lambda path: sorted(onnx.numpy_helper.to_array(i).shape[0]  # noqa: E731
                                   for i in onnx.load(str(path)).graph.initializer if len(i.dims) == 4)
    assert conv_out(quantized.variant("pruned")) == [6, 12] and conv_out(quantized.onnx) == [8, 16]


def test_apply_keeps_the_highest_l1_channels_and_the_function_of_unpruned_ones():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 1, 1, 1], [0.01, 0, 0, 0], [2, 2, 2, 2]]))
        model[2].weight[:, 1] = 0.0  # the weak channel contributes nothing, so removing it changes nothing
    cuts = prune.plan(model, 1 / 3)
    assert [(c.layer, c.keep) for c in cuts] == [("0", [0, 2])]
    small = prune.apply(model, cuts)
    assert small[0].out_features == 2 and small[2].in_features == 2
    x = torch.randn(5, 4)
    torch.testing.assert_close(small(x), model(x))


# ---------------------------------------------------------------- budgets and accuracy-aware quantization

class WithOutlier(nn.Module):
    """``mlp`` (Linear, ReLU, Linear) with a pass-through layer that adds one constant channel of OUTLIER."""

    def __init__(self, mlp: nn.Sequential):
        super().__init__()
        hidden = mlp[0].out_features
        self.body = nn.Sequential(mlp[0], nn.ReLU())
        self.spread = nn.Linear(hidden, hidden + 1)
        self.head = nn.Linear(hidden + 1, mlp[2].out_features)
        with torch.no_grad():
            self.spread.weight.zero_()
            self.spread.weight[:hidden] = torch.eye(hidden)
            self.spread.bias.zero_()
            self.spread.bias[hidden] = OUTLIER
            self.head.weight.zero_()
            self.head.weight[:, :hidden] = mlp[2].weight
            self.head.bias.copy_(mlp[2].bias)

    def forward(self, x):
        return self.head(self.spread(self.body(x)))


@pytest.fixture(scope="module")
def outlier_run(prepared, tmp_path_factory):
    """A run directory whose model.onnx is the outlier model (fp32 accuracy = the trained MLP's)."""
    import shutil

    from stages.contract import RunDir

    rd = RunDir(tmp_path_factory.mktemp("outlier")).ensure()
    for p in (prepared.data, prepared.dataset):
        shutil.copy(p, rd.root / p.name)
    data = dataset.load(rd.data, rd.dataset)
    x, y = (torch.from_numpy(a) for a in data.split("train"))
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(mlp.parameters(), lr=1e-2)
    for _ in range(150):  # full-batch steps: ~97% on digits in about a second
        loss = nn.functional.cross_entropy(mlp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model = nn.Sequential(nn.Flatten(), WithOutlier(mlp[1:])).eval()
    import models

    spec = models.ExportSpec()
    conversion.export_onnx(model, conversion.torch_example(data.split("test")[0]), rd.onnx, spec, 18, "dynamo")
    from stages.common import stamp_onnx
    from stages.onnx_model import Preprocessing

    # It takes the normalized split, and says so: a file that does not say how to feed it is refused.
    stamp_onnx(rd.onnx, {"labels": json.dumps(data.labels), "variant": "fp32",
                         "preprocessing": Preprocessing.from_dataset(data.info, in_graph=False).to_json()})
    return rd


def _static(config_overrides: dict) -> quantize.Config:
    return quantize.Config(variants=("int8-static",), calibration_samples=128, sensitivity_samples=128,
                           **config_overrides)


def test_a_variant_over_budget_is_kept_as_evidence_but_never_registered(outlier_run, copy_of):
    rd = copy_of(outlier_run)
    result = quantize.run(_static({"sensitivity": False}), rd, NullTracker())
    v = result.variants["int8-static"]
    assert v["status"] == "over-budget" and not v["eligible"] and not v["within_budget"]
    assert v["delta_points"] < -30, "the outlier must wreck plain static INT8 (else this test proves nothing)"
    assert rd.variant("int8-static").is_file(), "kept as evidence"
    assert "budget 0.5 points" in v["reason"]
    rows = [{"variant": n, "engine": "onnxruntime", "provider": "CPUExecutionProvider", "batch_size": 1,
             "median_ms": ms} for n, ms in (("fp32", 1.0), ("int8-static", 0.1))]
    name, why = register.choose(_report(rd)["variants"], rows, register.Config(target_batch_size=1))
    assert name == "fp32" and "not eligible: int8-static" in why
    with pytest.raises(StageError, match="not an eligible variant"):
        register.choose(_report(rd)["variants"], rows, register.Config(variant="int8-static"))


def test_sensitivity_loop_keeps_the_outlier_layer_in_float_and_fits_the_budget(outlier_run, copy_of):
    rd = copy_of(outlier_run)
    # 2 points: quantizing the small MLP's first layer alone costs up to ~0.7 (a few of 540 validation
    # samples); the outlier costs ~87, so the budget still separates "destroyed" from "fine".
    result = quantize.run(_static({"accuracy_budget": 2.0}), rd, NullTracker())
    v = result.variants["int8-static"]
    assert not v["attempts"][0]["within_budget"] and v["attempts"][0]["excluded_nodes"] == []
    assert v["attempts"][-1]["within_budget"] and v["status"] == "ok" and v["eligible"], v
    assert -v["delta_points"] <= 2.0
    # the layer reading the outlier tensor is the most sensitive; it and the layer making that tensor
    # (whose QDQ Gemm quantizes its own output) are the only ones kept in float
    table = json.loads(rd.sensitivity_json.read_text())
    graph = onnx.load(str(rd.onnx)).graph
    head = next(n for n in graph.node if n.output[0] == graph.output[0].name)
    spread = next(n.name for n in graph.node if n.output[0] == head.input[0])
    assert table["layers"][0]["node"] == head.name
    assert v["excluded_nodes"] == [head.name, spread] == table["excluded_nodes"]
    assert table["layers"][0]["sqnr_lost_db"] > 20
    assert f"| 1 | `{head.name}` |" in rd.sensitivity_md.read_text()
    props = {p.key: p.value for p in onnx.load(str(rd.variant("int8-static"))).metadata_props}
    assert json.loads(props["quantize.excluded_nodes"]) == [head.name, spread]
    # the rest is still INT8
    assert sum(n.op_type == "DequantizeLinear" for n in onnx.load(str(rd.variant("int8-static"))).graph.node) >= 2


def test_relative_budget_for_regression_and_vae():
    from stages.quantize import judge

    r2 = judge.verdict("regression", {"value": 0.80, "higher_is_better": True}, {"value": 0.79, "higher_is_better": True},
                       0.5, 0.02)
    assert r2.within and r2.delta == pytest.approx(-0.0125)
    mse = judge.verdict("vae", {"value": 0.10, "higher_is_better": False}, {"value": 0.103, "higher_is_better": False},
                        0.5, 0.02)
    assert not mse.within and mse.loss == pytest.approx(0.03)


def test_unknown_variant_name_is_a_config_error():
    from pipeline.config import ConfigError, recipe_from_dict

    with pytest.raises(ConfigError, match=r"`quantize.variants` has unknown names \['int3'\]"):
        recipe_from_dict({"name": "x", "model": {"family": "mlp"}, "quantize": {"variants": ["int3"]}})
