"""OnnxModel, the one owner of an exported ONNX file: its metadata read back typed, raw data fed as the
metadata says (in the graph, outside it, or explicitly as is), scoring that agrees with evaluate, and a
file that does not say how to feed it refused by quantize, benchmark, package and promote with the
same one-line message. Uses the session's exported/quantized run and a few hand-built graphs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from stages import benchmark, dataset, quantize
from stages import package as pkg
from stages.common import StageError
from stages.contract import NullTracker
from stages.onnx_model import NO_PREPROCESSING, UNKNOWN, ModelMeta, OnnxModel, Preprocessing

MISSING = ("model.onnx has no `preprocessing` metadata, so how to feed it is unknown; "
           "re-export it with `pipeline export`")


def rewrite_props(src: Path, dst: Path, drop: tuple[str, ...] = (), **changes: str) -> Path:
    """A copy of ``src`` at ``dst`` with metadata props removed or changed (the graph untouched)."""
    proto = onnx.load(str(src))
    props = {p.key: p.value for p in proto.metadata_props if p.key not in drop}
    props.update(changes)
    del proto.metadata_props[:]
    for k, v in props.items():
        proto.metadata_props.add(key=k, value=v)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(dst))
    return dst


def hand_built(path: Path, nodes, inputs, outputs, props: dict[str, str]) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8  # what this ONNX Runtime reads; onnx.helper writes its newest
    for k, v in props.items():
        proto.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


# ---------------------------------------------------------------- the record

def test_meta_round_trips_our_own_exports_metadata(exported):
    data = dataset.load(exported.data, exported.dataset)
    model = OnnxModel.open(exported.onnx)
    meta = model.meta
    assert meta == ModelMeta.read(exported.onnx)  # the session's view and the file's agree
    assert (meta.task, meta.labels, meta.variant, meta.family) == ("classification", tuple(data.labels), "fp32", "cnn")
    assert (meta.input.name, meta.input.dtype, meta.input.layout) == ("input", "float32", "NCHW")
    assert meta.input.shape[1:] == (1, 8, 8) and isinstance(meta.input.shape[0], str)  # a symbolic batch axis
    assert meta.inputs == (meta.input,) and meta.input.value_range == [0.0, 16.0]
    pre = meta.preprocessing
    assert pre.kind == "in-graph" and (pre.mean, pre.std) == (data.mean, data.std)
    assert pre.spec == Preprocessing.from_dataset(data.info, in_graph=True).spec  # what export wrote, read back
    assert meta.output_names == ["logits"] == [o.name for o in model.predictor.outputs]
    assert meta.primary_output == "logits" and "argmax" in meta.outputs[0].meaning
    metrics = json.loads(exported.metrics.read_text())
    assert meta.metrics["test_accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-6)
    assert meta.metrics["primary"] == metrics["primary"]
    assert meta.lineage["dataset_sha256"] == data.info["sha256"] and meta.lineage["recipe"] == "tiny"


def test_score_equals_the_evaluate_stages_metric_for_fp32(exported):
    data = dataset.load(exported.data, exported.dataset)
    x, y = data.split("test", normalized=False)
    primary = OnnxModel.open(exported.onnx).score(x, y)
    torch_primary = json.loads(exported.metrics.read_text())["primary"]
    assert (primary["name"], primary["higher_is_better"]) == ("accuracy", True)
    # ONNX Runtime reproduces PyTorch within 1e-4, so at most a genuine near-tie may flip one sample
    assert primary["value"] == pytest.approx(torch_primary["value"], abs=1 / len(y) + 1e-12)


# ---------------------------------------------------------------- feeding

def test_feed_in_and_out_of_the_graph_is_what_the_old_code_fed(exported, tmp_path):
    data = dataset.load(exported.data, exported.dataset)
    raw, _ = data.split("test", normalized=False)
    in_graph = OnnxModel.open(exported.onnx).feed(raw)
    assert list(in_graph) == ["input"] and in_graph["input"].dtype == np.float32
    np.testing.assert_array_equal(in_graph["input"], raw)  # raw, cast to the input dtype
    spec = dict(Preprocessing.from_dataset(data.info, in_graph=False).spec)
    outside = ModelMeta.read(rewrite_props(exported.onnx, tmp_path / "model.onnx", preprocessing=json.dumps(spec)))
    fed = outside.feed(raw)["input"]
    assert fed.dtype == np.float32
    np.testing.assert_array_equal(fed, data.normalize(raw))
    np.testing.assert_allclose(fed, (raw.astype(np.float32) - data.mean) / data.std, rtol=1e-6)


def test_per_channel_statistics_and_uint8_input():
    info = {"normalization": {"mean": [10.0, 120.0, 200.0], "std": [5.0, 60.0, 30.0]}, "raw_dtype": "uint8",
            "value_range": [0, 255]}
    raw = np.random.default_rng(0).integers(0, 256, (6, 3, 4, 4)).astype(np.uint8)
    inside = Preprocessing.from_dataset(info, in_graph=True)
    assert inside.apply(raw, "uint8").dtype == np.uint8 and np.array_equal(inside.apply(raw, "uint8"), raw)
    outside = Preprocessing.from_dataset(info, in_graph=False)
    assert (outside.kind, outside.axis, outside.input_dtype) == ("normalize", 1, "float32")
    expected = (raw.astype(np.float32) - np.float32([10, 120, 200]).reshape(1, 3, 1, 1)) \
        / np.float32([5, 60, 30]).reshape(1, 3, 1, 1)
    np.testing.assert_allclose(outside.apply(raw), expected, rtol=1e-6)
    assert outside.fed_range() == [[-2.0, -2.0, -6.666667], [49.0, 2.25, 1.833333]]


def test_as_is_is_stated_and_differs_from_missing():
    as_is = Preprocessing.parse(json.dumps(NO_PREPROCESSING))
    x = np.arange(6, dtype=np.int64).reshape(2, 3)
    assert as_is.kind == "none" and as_is.apply(x, "float32").dtype == np.float32
    np.testing.assert_array_equal(as_is.apply(x, "float32"), x)
    with pytest.raises(StageError, match="has no `preprocessing` metadata"):
        Preprocessing.parse(None, "model.onnx")


@pytest.mark.parametrize("value, key", [
    (None, "has no `preprocessing` metadata"),
    ("mean 0.5", "is not a JSON object"),
    ("{}", "has no `applied_in_graph`"),
    ('{"applied_in_graph": false}', "has no `mean` and `std`"),
    ('{"applied_in_graph": false, "steps": ["resize to 224"]}', "has no `mean` and `std`"),
    ('{"applied_in_graph": false, "mean": 0.5}', "has no `std`"),
])
def test_preprocessing_that_does_not_say_how_to_feed_is_one_error_naming_the_key(value, key):
    with pytest.raises(StageError) as e:
        Preprocessing.parse(value, "model.onnx")
    message = str(e.value)
    assert message.startswith("model.onnx") and key in message and "`pipeline export`" in message
    assert len(message.splitlines()) == 1


def test_wrong_sample_shape_names_what_the_input_takes(exported):
    meta = ModelMeta.read(exported.onnx)
    with pytest.raises(StageError, match=r"input 'input' takes samples shaped \[1, 8, 8\], got \[64\]"):
        meta.feed(np.zeros((2, 64), np.float32))


def test_several_inputs_are_fed_by_name(tmp_path):
    """Not only one input: the described one is normalized, another cast; a name with '/' is fine."""
    path = hand_built(
        tmp_path / "two.onnx",
        [helper.make_node("Cast", ["ids"], ["ids_f"], to=TensorProto.FLOAT),
         helper.make_node("Add", ["image/x", "ids_f"], ["sum"])],
        [helper.make_tensor_value_info("image/x", TensorProto.FLOAT, ["n", 3]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, ["n", 3])],
        [helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["n", 3])],
        {"task": "regression", "input.name": "image/x",
         "preprocessing": json.dumps({"applied_in_graph": False, "mean": 1.0, "std": 2.0})})
    model = OnnxModel.open(path)
    assert [i.name for i in model.meta.inputs] == ["image/x", "ids"] and model.meta.input.name == "image/x"
    raw = {"image/x": np.full((5, 3), 3.0), "ids": np.ones((5, 3))}
    feeds = model.feed(raw)
    assert feeds["ids"].dtype == np.int64 and feeds["image/x"].dtype == np.float32
    np.testing.assert_array_equal(model.run(feeds, batch_size=2)["sum"], np.full((5, 3), 2.0))  # (3-1)/2 + 1
    with pytest.raises(StageError, match="takes 2 inputs"):
        model.feed(np.zeros((5, 3)))
    unnamed = rewrite_props(path, tmp_path / "unnamed.onnx", drop=("input.name",))
    with pytest.raises(StageError, match="no `input.name` metadata"):
        ModelMeta.read(unnamed)


# ---------------------------------------------------------------- where former copies disagreed, the owner wins

def test_the_task_default_lives_in_one_place(exported, tmp_path):
    no_task = ModelMeta.read(rewrite_props(exported.onnx, tmp_path / "a" / "model.onnx", drop=("task",)))
    assert no_task.task == "classification"  # it names labels: files from before tasks were classifiers
    path = rewrite_props(exported.onnx, tmp_path / "b" / "model.onnx", drop=("task", "labels"))
    model = OnnxModel.open(path)
    assert model.meta.task == UNKNOWN
    with pytest.raises(StageError, match="its task is 'unknown' \\(metadata `task`\\)"):
        model.score(np.zeros((2, 1, 8, 8), np.float32), np.zeros(2, np.int64))


def test_a_vae_is_scored_against_the_normalized_input_even_when_its_graph_normalizes(tmp_path):
    """Its reconstruction lives in the normalized space; the old promote scorer compared it with the raw
    input it fed. This graph reconstructs perfectly: MSE 0 against the normalized input."""
    mean, std = 2.0, 4.0
    path = hand_built(
        tmp_path / "vae.onnx",
        [helper.make_node("Constant", [], ["mean"], value=helper.make_tensor("m", TensorProto.FLOAT, [], [mean])),
         helper.make_node("Constant", [], ["std"], value=helper.make_tensor("s", TensorProto.FLOAT, [], [std])),
         helper.make_node("Sub", ["x", "mean"], ["centred"]),
         helper.make_node("Div", ["centred", "std"], ["reconstruction"]),
         helper.make_node("Identity", ["reconstruction"], ["mu"]),
         helper.make_node("Sub", ["reconstruction", "reconstruction"], ["logvar"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", 4]) for n in ("reconstruction", "mu", "logvar")],
        {"task": "vae", "preprocessing": json.dumps({"applied_in_graph": True, "mean": mean, "std": std})})
    x = np.random.default_rng(0).uniform(0, 16, (10, 4)).astype(np.float32)
    model = OnnxModel.open(path)
    np.testing.assert_array_equal(model.feed(x)["x"], x)  # fed raw
    primary = model.score(x, np.zeros(10))
    assert primary == {"name": "reconstruction_mse", "value": pytest.approx(0.0, abs=1e-12), "higher_is_better": False}


# ---------------------------------------------------------------- one refusal, everywhere

@pytest.fixture
def stripped(quantized, copy_of):
    """A copy of the quantized run whose model.onnx lost its `preprocessing` metadata."""
    rd = copy_of(quantized)
    rewrite_props(rd.onnx, rd.onnx, drop=("preprocessing",))
    return rd


def test_a_file_that_does_not_say_how_to_feed_it_is_refused_everywhere_with_one_message(stripped, tiny_yaml, tmp_path):
    from tests.test_package import cli

    with pytest.raises(StageError) as opened:
        OnnxModel.open(stripped.onnx)
    with pytest.raises(StageError) as quantized:
        quantize.run(quantize.Config(variants=("int8-dynamic",)), stripped, NullTracker())
    with pytest.raises(StageError) as benchmarked:
        benchmark.run(benchmark.Config(batch_sizes=(1,), include_torch=False), stripped, NullTracker())
    with pytest.raises(StageError) as packaged:
        pkg.run(pkg.Config(samples=0), pkg.Source(stripped.onnx, str(stripped.onnx)), tmp_path / "out")
    assert [str(e.value) for e in (opened, quantized, benchmarked, packaged)] == [MISSING] * 4
    assert not (tmp_path / "out").exists()
    code, text = cli("package", "--recipe", str(tiny_yaml), "--model", str(stripped.onnx), "--samples", "0",
                     "--output", str(tmp_path / "cli"))
    assert (code, text.strip()) == (2, f"error: {MISSING}")  # the input must change: a usage error


def test_promote_refuses_a_candidate_that_does_not_say_how_to_feed_it(stripped, tmp_path):
    """A real registry (the session's temporary store): the candidate version's file is the stripped model."""
    from mlflow.tracking import MlflowClient

    from pipeline import lineage, tracking

    model_dir = tmp_path / "registered"
    model_dir.mkdir()
    shutil.copy(stripped.onnx, model_dir / "model.onnx")
    tracking.configure()
    client = MlflowClient()
    run = client.create_run(tracking.experiment_id("onnx-model-promote"), tags={"pipeline.rundir": str(stripped.root)})
    name = f"stripped-{run.info.run_id[:8]}"
    client.create_registered_model(name)
    version = client.create_model_version(name, source=str(model_dir), run_id=run.info.run_id,
                                          tags={"pipeline_run_id": run.info.run_id}).version
    client.set_registered_model_alias(name, "candidate", version)
    with pytest.raises(StageError) as e:
        lineage.promote(name)
    assert str(e.value) == MISSING
    assert "champion" not in client.get_registered_model(name).aliases
