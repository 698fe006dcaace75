"""import: ONNX files the pipeline did not make, from the zoo files the `onnx` package ships to hand-built
oddities, through import, quantize (judged by agreement with fp32 when there are no labels), benchmark,
register, the MLflow record, OnnxModel and a real HTTP server; and the one error each bad file gets.

The zoo files (``onnx/backend/test/data/light/``) are opset 9, IR 3, batch 1; ShuffleNet's input is
``gpu_0/data_0`` and its Reshapes hold the batch size, so its batch stays fixed; SqueezeNet's can be
made symbolic. Their weights are ``ConstantOfShape`` stand-ins (outputs do not depend on the input), so
the pipeline test gives ShuffleNet real tensors first (``benchmarks/foreign_models.py: with_weights``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging

import numpy as np
import pytest

from stages.common import StageError
from stages.contract import NullTracker, RunDir
from stages.onnx_model import UNKNOWN, ModelMeta, OnnxModel
from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("foreign_models", ROOT / "benchmarks" / "foreign_models.py")
fm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fm)


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def imported(path, tmp_path, **model) -> tuple[RunDir, dict]:
    """import_onnx.run on ``path`` into a fresh run directory; -> (run dir, import.json)."""
    from stages import import_onnx

    rundir = RunDir(tmp_path / "run").ensure()
    import_onnx.run(import_onnx.Config(path=str(path), **model), rundir, NullTracker())
    return rundir, json.loads(rundir.import_report.read_text())


def tiny_model(path, nodes, inputs, outputs, opset: int = 13, ir: int = 10, domains=()):
    import onnx
    from onnx import helper

    graph = helper.make_graph(nodes, "tiny", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                   *[helper.make_opsetid(d, 1) for d in domains]], ir_version=ir)
    onnx.save(model, str(path))
    return path


# ---------------------------------------------------------------- the zoo files, as shipped

@pytest.mark.parametrize("name, made_dynamic", [("squeezenet", True), ("shufflenet", False)])
def test_a_zoo_file_imports_unchanged_and_reproduces_its_expected_outputs(name, made_dynamic, tmp_path):
    """Checked, described with what is unknown marked so, copied (the original's bytes untouched), and
    the copy gives the output the onnx package expects for its reference input. SqueezeNet's fixed batch
    becomes symbolic (verified row by row); ShuffleNet's Reshapes hold the batch size, so it stays 1."""
    source = fm.light(name)
    before = sha256(source)
    rundir, report = imported(source, tmp_path)
    assert sha256(source) == before  # the original is never modified
    meta = ModelMeta.read(rundir.onnx)
    assert meta.family == "onnx" and meta.task == UNKNOWN and meta.labels == () and meta.input.layout is None
    assert meta.preprocessing.kind == "none" and not meta.preprocessing.known
    assert meta.props["input.layout"] == UNKNOWN and meta.props["lineage.source_sha256"] == before
    assert report["opset"] == 9 and report["ir_version"] == 3 and report["batch"]["made_dynamic"] is made_dynamic
    assert set(report["unknown"]) == {"task", "layout", "labels", "preprocessing"}
    assert meta.fixed_batch == (None if made_dynamic else 1)
    if name == "shufflenet":
        assert meta.input.name == "gpu_0/data_0" and "Reshape" in report["batch"]["reason"]

    model = OnnxModel.open(rundir.onnx)
    x = fm.reference_input([1, *meta.input.shape[1:]])
    np.testing.assert_allclose(model.run(x)[meta.output_names[0]], fm.expected_output(name), rtol=1e-3, atol=1e-7)
    if made_dynamic:  # four rows in one call, each the original's answer for that row alone
        rows = np.concatenate([x, x * 0.5, x[:, ::-1], 1 - x])
        original = OnnxModel.open(source, props=meta.props)
        alone = np.concatenate([original.run(rows[i:i + 1])[meta.output_names[0]] for i in range(4)])
        np.testing.assert_allclose(model.run(rows, batch_size=4)[meta.output_names[0]], alone, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- a foreign fixed-batch model, end to end

@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """ShuffleNet with real weights (IR 3, opset 9, fixed batch 1, `gpu_0/...` names; batch-norm statistics
    in one rough pass, enough for a test) and 60 unlabeled 224x224 RGB digit images."""
    root = tmp_path_factory.mktemp("foreign")
    images = fm.digit_images(60)
    np.savez(root / "images.npz", x=images)
    fm.with_weights(fm.light("shufflenet"), root / "shufflenet.onnx", images[:2], passes=1)
    (root / "labels.txt").write_text("\n".join(f"class {i}" for i in range(1000)) + "\n")
    return root


@pytest.fixture(scope="module")
def pipeline_run(foreign):
    """prepare -> import -> quantize -> benchmark -> register, tracked in the session's temporary store."""
    from pipeline.config import recipe_from_dict
    from pipeline.orchestrate import run_pipeline

    recipe = recipe_from_dict({
        "name": "foreign-shufflenet",
        "model": {"family": "onnx", "path": str(foreign / "shufflenet.onnx"), "labels_file": str(foreign / "labels.txt"),
                  "layout": "NCHW", "mean": list(fm.IMAGENET_MEAN), "std": list(fm.IMAGENET_STD),
                  "raw_value_range": [0, 255]},
        "prepare": {"dataset": "npz", "path": str(foreign / "images.npz"), "features": ["x"], "task": "unlabeled"},
        "quantize": {"variants": ["int8-dynamic", "int8-static"], "calibration_samples": 8,
                     "sensitivity": False},
        "benchmark": {"warmup_runs": 1, "min_runs": 3, "min_seconds": 0.02, "rounds": 1},
        "register": {"remeasure_rounds": 0}})
    rundir = RunDir(foreign / "run")
    outcomes = run_pipeline(recipe, rundir)
    return recipe, rundir, outcomes


def test_a_foreign_fixed_batch_model_is_quantized_by_agreement_benchmarked_and_registered(pipeline_run, foreign):
    from mlflow.tracking import MlflowClient

    recipe, rundir, outcomes = pipeline_run
    assert [o.stage for o in outcomes] == ["prepare", "import", "quantize", "benchmark", "register"]
    meta = ModelMeta.read(rundir.onnx)
    assert meta.task == "classification" and meta.labels[7] == "class 7" and meta.fixed_batch == 1
    assert meta.input.name == "gpu_0/data_0" and meta.preprocessing.kind == "normalize" and meta.preprocessing.known

    report = json.loads(rundir.variants.read_text())
    assert report["judged_by"] == "agreement with fp32" and report["metric"] == "top1_agreement" and report["fp32"] == 1.0
    rows = report["variants"]
    assert rows["fp32"]["top1_agreement"] == 1.0 and rows["fp32"]["eligible"]
    for name, row in rows.items():  # every variant that built was judged against fp32, never against labels
        if row["ok"]:
            assert "accuracy" not in row and 0.0 <= row["top1_agreement"] <= 1.0
            assert row["eligible"] == (row["top1_agreement"] >= 1.0 - report["budget"] / 100 - 1e-9), name
    assert rows["int8-static"]["calibration_samples"] == 8  # calibrated in batches of exactly 1

    bench = json.loads(rundir.benchmark_json.read_text())
    assert {r["batch_size"] for r in bench["rows"]} == {1} and bench["environment"]["fixed_batch"] == 1
    assert "torch" not in {r["variant"] for r in bench["rows"]}

    registration = json.loads(rundir.registration.read_text())
    chosen = registration["variant"]
    assert rows[chosen]["eligible"] and registration["target_batch_size"] == 1
    assert registration["objective_requested"] == "serving" and registration["fixed_batch"] == 1
    client = MlflowClient()
    version = client.get_model_version(recipe.name, registration["version"])
    tags = version.tags
    assert tags["source"] == "imported" and tags["judged_by"] == "agreement with fp32" and tags["fixed_batch"] == "1"
    assert tags["import.sha256"] == sha256(foreign / "shufflenet.onnx") and float(tags["metric.top1_agreement"]) >= 0.995
    assert set(client.get_registered_model(recipe.name).aliases) == {"candidate", "champion"}
    parent = client.get_run(json.loads(rundir.state.read_text())["parent_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {r.info.run_name for r in children} >= {"prepare", "import", "quantize", "benchmark", "register"}
    stamp = json.loads(rundir.result("import").read_text())
    assert stamp["models"].get("model.onnx")  # the imported copy is a LoggedModel, like an export


def test_reuse_and_explain_follow_the_imported_file(pipeline_run, foreign):
    """Nothing changed: every stage is reused. The file's bytes changed: import reruns, and --explain says why;
    so does prepare when the data file's bytes change."""
    from pipeline.orchestrate import plan

    recipe, rundir, _ = pipeline_run
    assert all(not d.run for d in plan(recipe, rundir))
    model = foreign / "shufflenet.onnx"
    saved = model.read_bytes()
    try:
        import onnx

        proto = onnx.load(str(model))
        proto.doc_string = "edited"
        onnx.save(proto, str(model))
        decisions = {d.stage: d for d in plan(recipe, rundir)}
        assert decisions["import"].run and any("model.path changed" in r for r in decisions["import"].reasons)
        assert decisions["prepare"].run is False
    finally:
        model.write_bytes(saved)
    data = foreign / "images.npz"
    saved = data.read_bytes()
    try:  # the data file's content is part of prepare's fingerprint too
        data.write_bytes(saved + b"\0")
        decisions = {d.stage: d for d in plan(recipe, rundir)}
        assert decisions["prepare"].run and any("prepare.path changed" in r for r in decisions["prepare"].reasons)
    finally:
        data.write_bytes(saved)


def test_the_registered_fixed_batch_model_serves_and_scores(pipeline_run):
    """One real HTTP infer on loopback gives OnnxModel's answer; two rows at once are a 400 naming batch 1
    (no merging for a fixed batch); OnnxModel runs several samples in batches of one and scores them."""
    import httpx

    from stages import dataset
    from stages.serve.config import RuntimeSettings
    from stages.serve.runtime import load_model
    from tests.test_serve import running_server, serve_config

    _, rundir, _ = pipeline_run
    path = rundir.variant(json.loads(rundir.registration.read_text())["variant"])
    model = OnnxModel.open(path)
    x_raw = dataset.load(rundir.data, rundir.dataset).split("test", normalized=False)[0][:3]
    fed = model.feed(x_raw)["gpu_0/data_0"]
    want = model.predict(x_raw)["gpu_0/softmax_1"]
    assert want.shape == (3, 1000)
    runtime = load_model(path, "shufflenet", runtime=RuntimeSettings(device="cpu", intra_op_threads=1))
    assert runtime.batchable is False
    with running_server([runtime], serve_config()) as base, httpx.Client(base_url=base, timeout=30) as http:
        body = {"inputs": [{"name": "gpu_0/data_0", "shape": [1, 3, 224, 224], "datatype": "FP32",
                            "data": fed[:1].ravel().tolist()}]}
        answer = http.post("/v2/models/shufflenet/infer", json=body)
        assert answer.status_code == 200, answer.text
        out = answer.json()["outputs"][0]
        assert out["name"] == "gpu_0/softmax_1" and out["shape"] == [1, 1000]
        np.testing.assert_allclose(np.asarray(out["data"], np.float32), want[0], rtol=1e-4, atol=1e-6)
        two = {"inputs": [{**body["inputs"][0], "shape": [2, 3, 224, 224], "data": fed[:2].ravel().tolist()}]}
        refused = http.post("/v2/models/shufflenet/infer", json=two)
        assert refused.status_code == 400 and "dim 0" in refused.json()["error"] and "must be 1" in refused.json()["error"]
        assert http.get("/v2/models/shufflenet").json()["inputs"][0]["shape"] == [1, 3, 224, 224]
    labels = want.argmax(axis=1)  # scored against its own top-1: accuracy 1.0 through the file's labels
    assert model.score(x_raw, labels) == {"name": "accuracy", "value": 1.0, "higher_is_better": True}


# ---------------------------------------------------------------- several inputs, several outputs, integers

def test_a_multi_input_multi_output_integer_input_model_imports_and_serves(tmp_path):
    import httpx
    from onnx import TensorProto, helper

    from stages.serve.config import RuntimeSettings
    from stages.serve.runtime import load_model
    from tests.test_serve import running_server, serve_config

    path = tiny_model(
        tmp_path / "two.onnx",
        [helper.make_node("Cast", ["ids"], ["ids_f"], to=TensorProto.FLOAT),
         helper.make_node("Add", ["image/x", "ids_f"], ["sum"]),
         helper.make_node("ReduceSum", ["ids"], ["count"], keepdims=0, axes=[1])],
        [helper.make_tensor_value_info("image/x", TensorProto.FLOAT, [1, 3]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 3])],
        [helper.make_tensor_value_info("sum", TensorProto.FLOAT, [1, 3]),
         helper.make_tensor_value_info("count", TensorProto.INT64, [1])], opset=11)
    rundir, report = imported(path, tmp_path, input="image/x", task="regression")
    assert report["batch"]["made_dynamic"] and [i["dtype"] for i in report["inputs"]] == ["float32", "int64"]
    meta = ModelMeta.read(rundir.onnx)
    assert [i.name for i in meta.inputs] == ["image/x", "ids"] and meta.input.name == "image/x"
    assert meta.output_names == ["sum", "count"] and meta.task == "regression" and meta.fixed_batch is None
    x, ids = np.array([[0.5, 1.5, 2.5], [1, 1, 1]], np.float32), np.array([[1, 2, 3], [0, 0, 7]], np.int64)
    out = OnnxModel.open(rundir.onnx).predict({"image/x": x, "ids": ids})
    np.testing.assert_array_equal(out["count"], [6, 7])
    runtime = load_model(rundir.onnx, "two", runtime=RuntimeSettings(device="cpu", intra_op_threads=1))
    with running_server([runtime], serve_config()) as base, httpx.Client(base_url=base, timeout=10) as http:
        answer = http.post("/v2/models/two/infer", json={"inputs": [
            {"name": "image/x", "shape": [2, 3], "datatype": "FP32", "data": x.ravel().tolist()},
            {"name": "ids", "shape": [2, 3], "datatype": "INT64", "data": ids.ravel().tolist()}]})
    assert answer.status_code == 200, answer.text
    got = {o["name"]: o for o in answer.json()["outputs"]}
    assert got["count"]["datatype"] == "INT64" and got["count"]["data"] == [6, 7]
    np.testing.assert_allclose(got["sum"]["data"], (x + ids).ravel())


# ---------------------------------------------------------------- one error per bad file (exit 2)

def bad_files(tmp_path):
    from onnx import TensorProto, helper

    x = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])]
    y = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])]
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(fm.light("squeezenet").read_bytes()[:5000])
    return {
        "truncated": (truncated, "truncated or not ONNX"),
        "opset 8": (tiny_model(tmp_path / "old.onnx", [helper.make_node("Relu", ["x"], ["y"])], x, y, opset=8, ir=3),
                    "uses opset 8 (ai.onnx); the pipeline takes opset 9 and newer. Convert it"),
        "unsupported op": (tiny_model(tmp_path / "custom.onnx",
                                      [helper.make_node("Frobnicate", ["x"], ["t"], domain="com.example"),
                                       helper.make_node("Blur", ["t"], ["y"], domain="com.example")], x, y,
                                      domains=("com.example",)),
                           "has no kernel for com.example:Blur, com.example:Frobnicate"),
    }


def test_each_bad_file_gets_one_error_and_exit_2(tmp_path):
    from tests.test_cli import invoke

    for what, (path, message) in bad_files(tmp_path).items():
        result = invoke("import-onnx", str(path), "--no-track", "--workdir", str(tmp_path / what), code=2)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], (what, result.stderr)
        assert "Traceback" not in result.stderr and not (tmp_path / what / "model.onnx").exists(), what
    logging.getLogger().handlers.clear()


def test_recipe_mistakes_name_the_fix():
    from pipeline.config import ConfigError, recipe_from_dict

    base = {"name": "x", "model": {"family": "onnx", "path": "m.onnx"}}
    with pytest.raises(ConfigError, match="`train` does not apply to model.family onnx"):
        recipe_from_dict({**base, "train": {"epochs": 1}})
    with pytest.raises(ConfigError, match="`model.mean` and `std` go together"):
        recipe_from_dict({**base, "model": {**base["model"], "mean": [0.5]}})
    with pytest.raises(ConfigError, match="`prepare.task: unlabeled` gives no targets to train on"):
        recipe_from_dict({"name": "y", "model": {"family": "mlp"},
                          "prepare": {"dataset": "npz", "path": "a.npz", "features": ["x"], "task": "unlabeled"}})
    from pipeline.orchestrate import stages_for

    assert stages_for(recipe_from_dict(base)) == ("import",)  # no data: imported only
    with_data = recipe_from_dict({**base, "prepare": {"dataset": "csv", "path": "a.csv", "task": "unlabeled"}})
    assert recipe_from_dict(with_data.to_dict()) == with_data and "train" not in with_data.to_dict()


def test_model_labels_must_match_the_class_scores(tmp_path):
    with pytest.raises(StageError, match="3 class names given .* output 'softmaxout_1' scores 1000 classes"):
        imported(fm.light("squeezenet"), tmp_path, labels=("a", "b", "c"))


# ---------------------------------------------------------------- the agreement gate and unlabeled data

def test_agreement_is_top1_for_classifiers_and_relative_error_otherwise():
    from stages.quantize import judge

    ref = {"p": np.array([[0.1, 0.9], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]], np.float32), "n": np.array([1, 2, 3, 4])}
    got = {"p": np.array([[0.2, 0.8], [0.3, 0.7], [0.6, 0.4], [0.3, 0.7]], np.float32), "n": np.array([1, 2, 3, 5])}
    top1 = judge.agreement("classification", ref, got, "p")
    assert top1["name"] == "top1_agreement" and top1["value"] == 0.75 and top1["per_output"]["n"] == 0.25
    v = judge.verdict("classification", {"value": 1.0, "higher_is_better": True}, top1, 0.5, 0.02)
    assert v.delta == -25.0 and not v.within
    other = judge.agreement(UNKNOWN, ref, got, "p")
    assert other["name"] == "relative_error" and other["value"] == pytest.approx(max(other["per_output"].values()))
    assert not judge.verdict(UNKNOWN, {}, other, 0.5, 0.02).within
    same = judge.agreement(UNKNOWN, ref, ref, "p")
    assert same["value"] == 0.0 and judge.verdict(UNKNOWN, {}, same, 0.5, 0.0).within
    assert judge.by_agreement("classification", labeled=False) and judge.by_agreement(UNKNOWN, labeled=True)
    assert not judge.by_agreement("classification", labeled=True) and not judge.by_agreement("vae", labeled=False)


def test_npz_and_csv_inputs_without_labels(tmp_path):
    from stages import dataset, prepare

    np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).uniform(0, 1, (120, 5)).astype(np.float32))
    (tmp_path / "x.csv").write_text("a,b\n" + "\n".join(f"{i},{i * 2}" for i in range(120)) + "\n")
    for kind, extra in (("npz", {"features": ("x",)}), ("csv", {})):
        rundir = RunDir(tmp_path / kind).ensure()
        prepare.run(prepare.Config(dataset=kind, path=str(tmp_path / f"x.{kind}"), task="unlabeled", **extra),
                    rundir, NullTracker())
        data = dataset.load(rundir.data, rundir.dataset)
        x, y = data.split("train", normalized=False)
        assert not data.labeled and data.labels == [] and y.shape == (len(x), 0), kind
        assert sum(data.info["splits"].values()) == 120
    with pytest.raises(ValueError, match="`label` is required for dataset npz"):
        prepare.Config(dataset="npz", path="a.npz", features=("x",))


def test_with_labels_an_imported_classifier_is_judged_by_accuracy_on_its_own_class_indices(tmp_path):
    """Labels 3 and 7 are classes 3 and 7 of the file's ten outputs (prepare numbers them 0 and 1): the
    accuracy budget applies as for our own exports, on the right classes."""
    from onnx import TensorProto, helper, numpy_helper

    from pipeline.config import recipe_from_dict
    from pipeline.orchestrate import run_pipeline

    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 10)).astype(np.float32)
    x = rng.normal(size=(600, 4)).astype(np.float32)
    y = (x @ w).argmax(axis=1)
    keep = np.isin(y, [3, 7])
    np.savez(tmp_path / "data.npz", x=x[keep], y=y[keep])
    model = tiny_model(tmp_path / "clf.onnx", [helper.make_node("MatMul", ["x", "w"], ["logits"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                       [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])])
    import onnx

    proto = onnx.load(str(model))
    proto.graph.initializer.append(numpy_helper.from_array(w, "w"))
    onnx.save(proto, str(model))
    recipe = recipe_from_dict({"name": "clf", "model": {"family": "onnx", "path": str(model), "task": "classification"},
                               "prepare": {"dataset": "npz", "path": str(tmp_path / "data.npz"), "features": ["x"],
                                           "label": "y"},
                               "quantize": {"variants": ["fp16"]}})
    rundir = RunDir(tmp_path / "run")
    run_pipeline(recipe, rundir, stages=("prepare", "import", "quantize"), track=False)
    report = json.loads(rundir.variants.read_text())
    assert report["judged_by"] == "labels" and report["metric"] == "accuracy" and report["fp32_accuracy"] == 1.0
    assert report["variants"]["fp16"]["eligible"] and report["variants"]["fp16"]["accuracy"] == 1.0
    meta = ModelMeta.read(rundir.onnx)
    np.testing.assert_array_equal(meta.class_indices(["3", "7"]), [3, 7])
    assert list(meta.class_indices(["a", "b"])) == [0, 1]
