"""Each stage on tiny data (NullTracker, temporary run directories): what it writes and what it refuses."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from stages.contract import RunDir
from stages.contract import NullTracker
from stages import benchmark, checkpoint, conversion, dataset, export, prepare, quantize, register, train
from stages.common import StageError
from stages.predictors import OrtPredictor, TorchPredictor


# ---------------------------------------------------------------- prepare

def test_prepare_writes_a_stratified_seeded_split(prepared):
    info = json.loads(prepared.dataset.read_text())
    assert info["source"] == "sklearn.datasets.load_digits"
    assert sum(info["splits"].values()) == 1797
    assert info["input_shape"] == [1, 8, 8] and info["input_layout"] == "NCHW"
    assert info["label_names"] == [str(i) for i in range(10)]
    data = dataset.load(prepared.data, prepared.dataset)
    x_train, y_train = data.split("train", normalized=False)
    # normalization statistics come from the training split alone
    assert info["normalization"]["mean"] == pytest.approx(float(x_train.mean()), rel=1e-6)
    assert info["normalization"]["std"] == pytest.approx(float(x_train.std()), rel=1e-6)
    # stratified: every split holds every class in about the overall proportion
    for split in ("train", "val", "test"):
        counts = np.asarray(info["class_counts"][split])
        assert counts.min() > 0 and counts.max() / counts.min() < 1.3


def test_prepare_is_deterministic_and_the_hash_tracks_content(tmp_path):
    a, b, c = (RunDir(tmp_path / n).ensure() for n in "abc")
    ra = prepare.run(prepare.Config(seed=0), a, NullTracker())
    rb = prepare.run(prepare.Config(seed=0), b, NullTracker())
    rc = prepare.run(prepare.Config(seed=1), c, NullTracker())
    assert ra.sha256 == rb.sha256 != rc.sha256


def test_corrupt_data_file_is_one_clear_error(prepared, copy_of):
    rd = copy_of(prepared)
    rd.data.write_bytes(b"not a zip")
    with pytest.raises(StageError, match="corrupt.*pipeline prepare"):
        dataset.load(rd.data, rd.dataset)


# ---------------------------------------------------------------- train

def test_checkpoint_rebuilds_the_model_without_the_recipe(trained):
    raw = torch.load(trained.checkpoint, map_location="cpu", weights_only=True)  # no pickled code needed
    assert raw["model"]["family"] == "cnn" and raw["label_names"][0] == "0"
    model, meta = checkpoint.load(trained.checkpoint)
    x, _ = dataset.load(trained.data, trained.dataset).split("val")
    acc = (TorchPredictor(model).predict(x).argmax(1) == dataset.load(trained.data, trained.dataset).split("val")[1]).mean()
    assert acc == pytest.approx(meta["val_accuracy"], abs=1e-6)
    assert json.loads(trained.checkpoint_json.read_text())["epoch"] == meta["epoch"]


def test_training_is_seeded(tiny_recipe, prepared, copy_of):
    rd = copy_of(prepared)
    kwargs = dict(family="cnn", model_config=tiny_recipe.model.config)
    cfg = tiny_recipe.train.__class__(**{**tiny_recipe.train.__dict__, "epochs": 2})
    first = train.run(cfg, rd, NullTracker(), **kwargs)
    history = json.loads(rd.history.read_text())
    second = train.run(cfg, rd, NullTracker(), **kwargs)
    assert json.loads(rd.history.read_text()) == history
    assert (first.val_accuracy, first.val_loss) == (second.val_accuracy, second.val_loss)


def test_training_learns(trained):
    history = json.loads(trained.history.read_text())
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert max(h["val_accuracy"] for h in history) > 0.8


def test_corrupt_checkpoint_is_one_clear_error(trained, copy_of):
    rd = copy_of(trained)
    rd.checkpoint.write_bytes(b"garbage")
    with pytest.raises(StageError, match="corrupt or not a checkpoint"):
        checkpoint.load(rd.checkpoint)


# ---------------------------------------------------------------- evaluate

def test_evaluate_writes_metrics_and_a_confusion_matrix(evaluated):
    m = json.loads(evaluated.metrics.read_text())
    assert 0.8 < m["accuracy"] <= 1.0
    assert set(m["per_class"]) == {str(i) for i in range(10)}
    assert sum(map(sum, m["confusion_matrix"])) == m["samples"]
    assert evaluated.confusion_matrix.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- export

def test_export_is_one_checked_self_describing_file_with_a_dynamic_batch(exported):
    assert not list(exported.root.glob("*.data")), "weights must live inside model.onnx"
    model = onnx.load(str(exported.onnx))
    onnx.checker.check_model(model, full_check=True)
    dim0 = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value, "batch axis must be symbolic"
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["labels"]) == [str(i) for i in range(10)]
    assert props["input.layout"] == "NCHW" and json.loads(props["input.shape"]) == [-1, 1, 8, 8]
    assert "mean" in json.loads(props["preprocessing"])
    assert "lineage.training_run_id" in props and props["export.opset"] == "18"
    assert any(o.domain in ("", "ai.onnx") and o.version == 18 for o in model.opset_import)
    report = json.loads(exported.export_report.read_text())
    assert report["attempts"][-1]["ok"] and set(report["attempts"][-1]["batches"]) == {"1", "2", "37"}


def test_exported_model_matches_torch_at_odd_batch(exported):
    model, _ = checkpoint.load(exported.checkpoint)
    data = dataset.load(exported.data, exported.dataset)
    raw = data.split("test", normalized=False)[0][:37]  # the file takes raw pixels and normalizes them itself
    np.testing.assert_allclose(OrtPredictor(exported.onnx).predict(raw), TorchPredictor(model).predict(data.normalize(raw)),
                               atol=1e-4)


def test_compare_outputs_reports_every_mismatch_at_once():
    a = {"logits": np.zeros((2, 3), np.float32), "probs": np.zeros((2, 3), np.float32), "gone": np.zeros(1)}
    b = {"logits": np.full((2, 3), 0.5, np.float32), "probs": np.zeros((3, 3), np.float32)}
    problems, worst = conversion.compare_outputs(a, b, atol=1e-4, rtol=1e-3, where="batch 2")
    text = "\n".join(problems)
    assert len(problems) == 3
    assert "missing ['gone']" in text
    assert "'probs' has shape [3, 3], PyTorch gives [2, 3]" in text
    assert "'logits' max |diff| 5.000e-01" in text and worst == 0.5


def test_failed_validation_raises_names_the_output_and_keeps_the_previous_file(exported, copy_of, tiny_recipe):
    rd = copy_of(exported)
    before = rd.onnx.read_bytes()
    # Tolerance zero: ONNX Runtime's float arithmetic differs from PyTorch's in the last bits.
    strict = export.Config(atol=0.0, rtol=0.0, exporter="legacy")
    with pytest.raises(export.ValidationError, match=r"\[legacy\] batch \d+: output 'logits' max \|diff\|"):
        export.run(strict, rd, NullTracker())
    assert rd.onnx.read_bytes() == before, "a failed export must not replace the last good model"
    assert not [p for p in rd.root.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------- quantize (more in test_quantize.py)

def test_quantize_writes_variants_json_that_benchmark_and_register_read(quantized):
    report = json.loads(quantized.variants.read_text())
    assert report["task"] == "classification" and report["metric"] == "accuracy"
    assert report["fp32_accuracy"] == report["fp32"] and report["accuracy_budget_points"] == 0.5
    for name, v in report["variants"].items():
        assert v["status"] in ("ok", "over-budget", "not-applicable", "failed")
        assert v["ok"] == quantized.variant(name).is_file() or v["status"] == "not-applicable"


# ---------------------------------------------------------------- benchmark

def test_benchmark_covers_torch_and_every_variant_with_the_provider_used(benchmarked):
    data = json.loads(benchmarked.benchmark_json.read_text())
    rows = data["rows"]
    seen = {(r["variant"], r["batch_size"]) for r in rows}
    for v in ("torch", "fp32", "int8-static", "int8-dynamic"):
        assert {(v, 1), (v, 8)} <= seen
    for r in rows:
        assert r["median_ms"] > 0 and r["p99_ms"] >= r["median_ms"] * 0.999 and r["samples_per_s"] > 0
        assert r["runs"] >= 5
        assert r["provider"] in ("CPUExecutionProvider", "CUDAExecutionProvider", "torch-cpu", "torch-cuda")
    assert data["environment"]["git.commit"] and data["environment"]["onnxruntime-gpu" if "onnxruntime-gpu" in data["environment"] else "onnxruntime"]
    md = benchmarked.benchmark_md.read_text()
    assert "| variant | engine | provider |" in md and "int8-static" in md


# ---------------------------------------------------------------- register (the choice; registration is end to end)

def _rows(**ms):
    return [{"variant": v, "engine": "onnxruntime", "provider": "CPUExecutionProvider", "batch_size": 1,
             "median_ms": t, "p90_ms": t * 1.1, "samples_per_s": 1e3 / t} for v, t in ms.items()]


def test_register_picks_the_fastest_variant_within_budget():
    variants = {"fp32": {"ok": True, "within_budget": True}, "int8-static": {"ok": True, "within_budget": True},
                "int8-dynamic": {"ok": True, "within_budget": False}}
    at_1 = register.Config(target_batch_size=1)
    name, why = register.choose(variants, _rows(fp32=0.06, **{"int8-static": 0.05, "int8-dynamic": 0.01}), at_1)
    assert name == "int8-static" and "not eligible: int8-dynamic (over the accuracy budget)" in why
    name, _ = register.choose(variants, _rows(fp32=0.04, **{"int8-static": 0.05}), at_1)
    assert name == "fp32"


def test_register_refuses_a_forced_variant_outside_the_budget():
    variants = {"fp32": {"ok": True, "within_budget": True}, "int8-dynamic": {"ok": True, "within_budget": False}}
    with pytest.raises(StageError, match="not an eligible variant"):
        register.choose(variants, _rows(fp32=1.0), register.Config(variant="int8-dynamic"))
    with pytest.raises(StageError, match="add 64 to benchmark.batch_sizes"):
        register.choose(variants, _rows(fp32=1.0), register.Config(target_batch_size=64))


def _rows_at(times: dict[str, dict[int, float]]):
    return [{"variant": v, "engine": "onnxruntime", "provider": "CPUExecutionProvider", "batch_size": b,
             "median_ms": t, "p90_ms": t * 1.1, "samples_per_s": b * 1e3 / t}
            for v, by in times.items() for b, t in by.items()]


def test_register_objective_serving_scores_the_batches_the_server_forms():
    """int8 wins only at batch 256, which a server batching up to 64 rows never runs: the serving
    objective (geometric mean of samples/s over batches 1..max_batch_size) picks fp32, throughput@256 int8."""
    variants = {"fp32": {"ok": True, "within_budget": True}, "int8-dynamic": {"ok": True, "within_budget": True}}
    rows = _rows_at({"fp32": {1: 0.05, 8: 0.2, 64: 1.0, 256: 6.0}, "int8-dynamic": {1: 0.08, 8: 0.3, 64: 1.4, 256: 1.0}})
    name, why = register.choose(variants, rows, register.Config(), max_batch_size=64)
    assert name == "fp32" and "geometric mean of samples/s over batches 1, 8, 64" in why
    assert register.choose(variants, rows, register.Config(objective="throughput@256"))[0] == "int8-dynamic"
    assert register.choose(variants, rows, register.Config(objective="batch-1-latency"))[0] == "fp32"
    # A larger max batch lets 256 count: int8's 6x there outweighs its losses at 1, 8 and 64.
    assert register.choose(variants, rows, register.Config(), max_batch_size=256)[0] == "int8-dynamic"
    assert register.Config(target_batch_size=8).objective == "throughput@8"  # the old spelling
    with pytest.raises(ValueError, match="`objective` must be serving, batch-1-latency or throughput@N"):
        register.Config(objective="fastest")


# ---------------------------------------------------------------- providers

def _session_options(session) -> dict:
    opts = session.get_session_options()
    return {"intra": opts.intra_op_num_threads, "inter": opts.inter_op_num_threads,
            "spinning": opts.get_session_config_entry("session.intra_op.allow_spinning"),
            "providers": session.get_providers()}


def test_one_session_factory_builds_the_servers_sessions_for_register_too(exported):
    """register re-measures with OrtPredictor(settings=serve.runtime.session_settings()); the server loads
    with load_model(runtime=serve.runtime): the sessions come out the same (threads, spinning, providers)."""
    from stages.serve.config import RuntimeSettings
    from stages.serve.runtime import load_model
    from stages.sessions import SessionSettings, create_session

    runtime = RuntimeSettings(device="cpu", intra_op_threads=1, allow_spinning=False)
    served = load_model(exported.onnx, "m", runtime=runtime)
    measured = OrtPredictor(exported.onnx, settings=runtime.session_settings())
    assert _session_options(served.session) == _session_options(measured.session) == {
        "intra": 1, "inter": 1, "spinning": "0", "providers": ["CPUExecutionProvider"]}
    # The factory applies what it is given, and "auto" resolves for this machine.
    spinning = create_session(exported.onnx, SessionSettings(device="cpu", intra_op_threads=2, allow_spinning=True))
    assert _session_options(spinning) == {"intra": 2, "inter": 1, "spinning": "1", "providers": ["CPUExecutionProvider"]}
    auto = SessionSettings().resolved()
    assert auto.intra_op_threads >= 1 and isinstance(auto.allow_spinning, bool)
    with pytest.raises(ValueError, match="`intra_op_threads` must be an integer >= 0"):
        SessionSettings(intra_op_threads=-1)


def test_the_session_factory_imports_neither_torch_nor_onnxruntime():
    """The slim serve path imports stages.sessions: importing it loads no torch, onnxruntime or numpy."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    code = "import sys, stages.sessions; print(sorted(m for m in ('torch', 'onnxruntime', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_cuda_request_without_a_gpu_is_reported_not_hidden(exported, caplog):
    from stages.predictors import cuda_available

    if cuda_available():
        pytest.skip("a GPU is present: the CUDA provider is expected to be active here")
    p = OrtPredictor(exported.onnx, device="cuda")
    assert p.providers == ["CPUExecutionProvider"] and p.cuda_fell_back
    assert "CUDA was requested" in caplog.text


def test_cuda_provider_is_active_on_a_gpu(exported):
    from stages.predictors import cuda_available

    if not cuda_available():
        pytest.skip("no CUDA GPU on this machine; run on the GPU machine to exercise the CUDA provider")
    p = OrtPredictor(exported.onnx, device="cuda")
    assert p.providers[0] == "CUDAExecutionProvider"
