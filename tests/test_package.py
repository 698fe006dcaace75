"""package: the bundle and its model.json, the Python and Node examples against in-process ONNX Runtime
on the whole test split (a normalized-input model and a raw-uint8-input one), the Triton repository
against Triton's own model-configuration schema and served by onnx-pipeline's server, the KServe
manifest, and the command's errors.

Triton's schema is the ``model_config.proto`` descriptor that NVIDIA ships in tritonclient
(``tritonclient/grpc/model_config_pb2.py``), taken from the test-only .venv-triton that `make test`
builds (tritonclient would downgrade protobuf in the project's venv, so it never goes there). We read
the serialized descriptor out of that file and build the message class in a private descriptor pool
of the project's own protobuf, so the check does not depend on the generated code's version guard.
"""

from __future__ import annotations

import ast
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from stages import dataset
from stages import package as pkg
from stages.onnx_model import NO_PREPROCESSING, ModelMeta, OnnxModel
from tests.conftest import ROOT

PY_EXAMPLE = ROOT / "examples" / "python" / "classify.py"
NODE_DIR = ROOT / "examples" / "node"
# Triton's model-configuration schema as NVIDIA ships it, in the test-only .venv-triton (see the Makefile).
TRITON_SCHEMAS = sorted(ROOT.glob(".venv-triton/lib/python3*/site-packages/tritonclient/grpc/model_config_pb2.py"))
NEAR_TIE = 1e-4  # top-2 logit margin under which two ONNX Runtime builds may honestly disagree


def cli(*args: str):
    """`pipeline ...` in-process; returns (exit code, everything it printed)."""
    result = CliRunner().invoke(app, list(args))
    logging.getLogger().handlers.clear()  # _setup_logging bound a handler to the runner's closed stream
    return result.exit_code, result.output


def run_example(cmd: list[str]) -> tuple[int, list[list[str]], str]:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.stdout, p.stderr[-2000:]
    lines = p.stdout.strip().splitlines()
    assert lines[0].startswith("#") and lines[-1].startswith("accuracy"), p.stdout[-2000:]
    return p.returncode, [line.split("\t") for line in lines[1:-1]], p.stdout


def reference_labels(onnx_path: Path, data, labels: list[str]) -> tuple[list[str], np.ndarray]:
    """In-process ONNX Runtime through the project's own OnnxModel, fed what the file's metadata says
    it takes (raw when its graph normalizes, else normalized): labels and top-2 margins."""
    model = OnnxModel.open(onnx_path)
    raw, _ = data.split("test", normalized=False)
    logits = model.predict(raw)[model.meta.primary_output]
    top2 = np.sort(logits, axis=1)[:, -2:]
    return [labels[i] for i in logits.argmax(1)], top2[:, 1] - top2[:, 0]


# --- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundle(exported, tiny_yaml, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("package") / "bundle"
    code, text = cli("package", "--recipe", str(tiny_yaml), "--workdir", str(exported.root), "--output", str(out),
                     "--samples", "all")
    assert code == 0, text
    return out


@pytest.fixture(scope="module")
def test_split(exported):
    return dataset.load(exported.data, exported.dataset)


@pytest.fixture(scope="module")
def python_run(bundle):
    return run_example([sys.executable, str(PY_EXAMPLE), str(bundle)])


@pytest.fixture(scope="module")
def raw_input_bundle(exported, test_split, tmp_path_factory) -> tuple[Path, Path]:
    """The same model with its normalization moved into the graph: uint8 pixels in, plus a softmax
    `probabilities` output, as the export stage may write it. Packaged with a uint8 test split."""
    import onnx
    from onnx import TensorProto, helper

    proto = onnx.load(str(exported.onnx))
    props = {p.key: p.value for p in proto.metadata_props}
    pre = json.loads(props["preprocessing"])
    graph = proto.graph
    name = graph.input[0].name
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    if not pre.get("applied_in_graph"):
        graph.initializer.extend([helper.make_tensor("pre_mean", TensorProto.FLOAT, [], [pre["mean"]]),
                                  helper.make_tensor("pre_std", TensorProto.FLOAT, [], [pre["std"]])])
    elem = graph.input[0].type.tensor_type.elem_type
    if pre.get("applied_in_graph"):  # the export already normalizes in the graph: only take uint8 in front
        front = [helper.make_node("Cast", ["raw"], [name], to=elem)]
    else:
        front = [helper.make_node("Cast", ["raw"], ["raw_f"], to=TensorProto.FLOAT),
                 helper.make_node("Sub", ["raw_f", "pre_mean"], ["centred"]),
                 helper.make_node("Div", ["centred", "pre_std"], [name])]
    has_probabilities = any(o.name == "probabilities" for o in graph.output)
    softmax = [] if has_probabilities else [helper.make_node("Softmax", [graph.output[0].name], ["probabilities"], axis=1)]
    nodes = front + list(graph.node) + softmax
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info("raw", TensorProto.UINT8, dims))
    if not has_probabilities:
        graph.output.append(helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [dims[0], None]))
    del proto.metadata_props[:]
    props.update({"input.name": "raw", "input.dtype": "uint8",
                  "preprocessing": json.dumps({**pre, "applied_in_graph": True, "input_dtype": "uint8",
                                               "formula": f"(float(x) - {pre['mean']}) / {pre['std']}"})})
    for k, v in props.items():
        proto.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(proto)
    root = tmp_path_factory.mktemp("raw-input")
    onnx.save(proto, str(root / "raw.onnx"))
    x, y = test_split.split("test", normalized=False)
    assert np.array_equal(x, np.round(x)) and x.max() <= 255  # digits pixels are small integers
    split = pkg.TestSplit(x=x.astype(np.uint8), y=y, dataset_sha256=test_split.info["sha256"])
    pkg.run(pkg.Config(samples=-1), pkg.Source(root / "raw.onnx", str(root / "raw.onnx")), root / "bundle", split)
    return root / "bundle", root / "raw.onnx"


# --- the bundle -------------------------------------------------------------------------------

def test_bundle_is_one_onnx_file_and_a_model_json_drawn_from_its_metadata(bundle, exported, test_split):
    import onnxruntime as ort

    from stages.common import sha256_file

    assert sorted(p.name for p in bundle.iterdir()) == ["README.md", "model.json", "model.onnx", "samples.json"]
    meta = json.loads((bundle / "model.json").read_text())
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    props = session.get_modelmeta().custom_metadata_map
    graph_in = session.get_inputs()[0]
    assert meta["input"]["name"] == graph_in.name == props["input.name"]
    assert meta["input"]["dtype"] == props["input.dtype"] and graph_in.type == "tensor(float)"  # digits: float32
    assert meta["input"]["shape"] == [-1, 1, 8, 8] == json.loads(props["input.shape"])
    assert meta["input"]["layout"] == props["input.layout"] == "NCHW"
    assert meta["labels"] == json.loads(props["labels"]) == test_split.labels
    pre = json.loads(props["preprocessing"])
    assert meta["preprocessing"]["applied_in_graph"] is pre.get("applied_in_graph", False)  # as the export wrote it
    assert (meta["preprocessing"]["mean"], meta["preprocessing"]["std"]) == (pre["mean"], pre["std"])
    assert [o["name"] for o in meta["outputs"]] == [o.name for o in session.get_outputs()]
    assert meta["outputs"][0]["name"] == "logits" and meta["outputs"][0]["meaning"]
    assert meta["model"]["sha256"] == sha256_file(bundle / "model.onnx")
    assert meta["model"]["opsets"]["ai.onnx"] == int(props["export.opset"])
    assert meta["runtime"]["verified_with"]["onnxruntime"] == ort.__version__
    assert "standard ONNX operators only" in meta["runtime"]["requires"]
    assert meta["metrics"]["test_accuracy"] == pytest.approx(float(props["metrics.test_accuracy"]))
    assert meta["lineage"]["dataset_sha256"] == test_split.info["sha256"]
    assert meta["input"]["raw"] == {"dtype": "float32", "value_range": [0.0, 16.0]}  # 8x8 digits: 0..16
    model_range = [0, 16] if pre["applied_in_graph"] else [(0 - pre["mean"]) / pre["std"], (16 - pre["mean"]) / pre["std"]]
    assert meta["input"]["value_range"] == pytest.approx(model_range, abs=1e-5)
    # the whole test split rides along, raw, with true labels and ONNX Runtime's outputs
    x, y = test_split.split("test", normalized=False)
    samples = json.loads((bundle / "samples.json").read_text())["samples"]
    assert meta["samples"]["count"] == len(samples) == len(y)
    assert np.array_equal(np.asarray([s["input"] for s in samples], np.float32), x)
    assert [s["label_index"] for s in samples] == y.tolist()
    readme = (bundle / "README.md").read_text()
    assert ("applies the preprocessing itself" if pre["applied_in_graph"] else "(raw - mean) / std") in readme
    assert meta["model"]["sha256"] in readme


def test_python_example_uses_only_onnxruntime_and_numpy():
    tree = ast.parse(PY_EXAMPLE.read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported - {"__future__", "json", "sys", "pathlib"} == {"numpy", "onnxruntime"}


def test_python_example_matches_in_process_onnxruntime_on_the_test_split(python_run, exported, test_split):
    code, rows, out = python_run
    _, y = test_split.split("test")
    expected, _ = reference_labels(exported.onnx, test_split, test_split.labels)
    assert code == 0, out[-1000:]  # every sample matched the bundle's recorded outputs
    assert [r[1] for r in rows] == expected
    assert [r[3] for r in rows] == [test_split.labels[i] for i in y]


def _node_or_skip():
    if shutil.which("node") is None:
        pytest.skip("node is not installed; the Node example needs Node.js >= 18")
    if not (NODE_DIR / "node_modules" / "onnxruntime-node").is_dir():
        pytest.skip("examples/node/node_modules missing; `make test-deps` installs it (needs npm)")


def _assert_same_predictions(node_rows, python_rows, margins):
    assert len(node_rows) == len(python_rows) == len(margins)
    differ = [i for i, (a, b) in enumerate(zip(node_rows, python_rows)) if (a[0], a[1], a[3]) != (b[0], b[1], b[3])]
    # Two ONNX Runtime builds may only part ways on a genuine near-tie of the top two logits.
    assert all(margins[i] < NEAR_TIE for i in differ), [(node_rows[i], python_rows[i], margins[i]) for i in differ]
    assert len(differ) <= 1


def test_node_example_prints_the_same_predictions_as_python_on_the_whole_test_split(bundle, python_run, exported,
                                                                                   test_split):
    _node_or_skip()
    code, rows, out = run_example(["node", str(NODE_DIR / "classify.js"), str(bundle)])
    assert code == 0, out[-1000:]  # its outputs match the bundle's, within samples.json's tolerance
    _, margins = reference_labels(exported.onnx, test_split, test_split.labels)
    _assert_same_predictions(rows, python_run[1], margins)
    assert out.strip().splitlines()[-1] == python_run[2].strip().splitlines()[-1]  # accuracy and self-check line


def test_examples_feed_raw_uint8_to_a_model_that_normalizes_in_its_graph(raw_input_bundle, exported, test_split):
    bundle, _ = raw_input_bundle
    meta = json.loads((bundle / "model.json").read_text())
    assert meta["input"]["dtype"] == "uint8" and meta["preprocessing"]["applied_in_graph"] is True
    assert [o["name"] for o in meta["outputs"]] == ["logits", "probabilities"]
    assert "applies the preprocessing itself" in (bundle / "README.md").read_text()
    expected, margins = reference_labels(exported.onnx, test_split, test_split.labels)
    code, py_rows, out = run_example([sys.executable, str(PY_EXAMPLE), str(bundle)])
    assert code == 0, out[-1000:]
    assert [r[1] for r in py_rows] == expected
    if shutil.which("node") and (NODE_DIR / "node_modules" / "onnxruntime-node").is_dir():
        code, node_rows, out = run_example(["node", str(NODE_DIR / "classify.js"), str(bundle)])
        assert code == 0, out[-1000:]
        _assert_same_predictions(node_rows, py_rows, margins)


# --- Triton and KServe ------------------------------------------------------------------------

def _triton_model_config_class():
    """Triton's ModelConfig message, from the schema vendored in stages/serve/triton."""
    from stages.serve import triton

    return triton.model_config_class()


def test_vendored_schema_accepts_everything_the_installed_tritons_does():
    """stages/serve/triton/model_config_desc.py (from tritonclient 2.73.0) keeps every message, field and enum
    value of the schema in .venv-triton's tritonclient (pinned 2.46.0 for perf_analyzer) with the same number,
    type and label: a config.pbtxt that Triton accepts is never refused here as an unknown field."""

    from stages.serve.triton import model_config_desc, vendor

    if not TRITON_SCHEMAS:
        pytest.skip("Triton's model_config_pb2.py not found in .venv-triton; `make test` installs tritonclient there")

    theirs = vendor.schema_shape(vendor.serialized_descriptor(TRITON_SCHEMAS[-1]))
    ours = vendor.schema_shape(model_config_desc.SERIALIZED)
    assert len(theirs) > 100
    assert {k: v for k, v in theirs.items() if ours.get(k) != v} == {}


@pytest.fixture(scope="module")
def triton_repo(exported, tiny_yaml, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("triton") / "repo"
    code, text = cli("package", "--recipe", str(tiny_yaml), "--workdir", str(exported.root), "--output", str(out),
                     "--format", "triton", "--version", "3")
    assert code == 0, text
    return out


def test_triton_repository_parses_against_tritons_model_config_schema(triton_repo, test_split, tiny_recipe):
    from google.protobuf import text_format

    assert sorted(str(p.relative_to(triton_repo)) for p in triton_repo.rglob("*") if p.is_file()) == \
        ["tiny/3/model.onnx", "tiny/config.pbtxt", "tiny/labels.txt"]
    ModelConfig = _triton_model_config_class()
    config = text_format.Parse((triton_repo / "tiny" / "config.pbtxt").read_text(), ModelConfig())  # strict: unknown fields fail
    assert config.name == "tiny" and config.platform == "onnxruntime_onnx"
    wanted = tiny_recipe.serve.batching  # `pipeline package` passes the recipe's serve.batching
    assert config.max_batch_size == wanted.max_batch_size > 0
    assert config.HasField("dynamic_batching") == wanted.enabled
    assert config.dynamic_batching.max_queue_delay_microseconds == round(wanted.max_queue_delay_ms * 1000)
    [inp] = config.input
    assert (inp.name, list(inp.dims)) == ("input", [1, 8, 8])
    assert ModelConfig.DESCRIPTOR.fields_by_name["input"].message_type.fields_by_name["data_type"] \
        .enum_type.values_by_number[inp.data_type].name == "TYPE_FP32"
    [out] = config.output
    assert (out.name, list(out.dims), out.label_filename) == ("logits", [10], "labels.txt")
    assert (triton_repo / "tiny" / "labels.txt").read_text().split() == test_split.labels


def test_triton_config_round_trips_the_batching_the_server_reads(exported, tmp_path):
    """What package writes from a BatchSettings, the server's repository reader turns back into the same
    BatchSettings; and the text itself round-trips through ModelConfig unchanged."""
    from stages.serve import triton
    from stages.serve.config import BatchSettings
    from stages.serve.repository import read_model_config, scan_repository

    for n, batching in enumerate([BatchSettings(True, 8, 2.5, (4, 8)), BatchSettings(True, 16, 0.0),
                                  BatchSettings(False, 32)]):
        out = tmp_path / f"r{n}"
        pkg.run(pkg.Config(format="triton", name="m", batching=batching), pkg.Source(exported.onnx, str(exported.onnx)), out)
        text = (out / "m" / "config.pbtxt").read_text()
        message = read_model_config(out / "m" / "config.pbtxt")
        assert triton.parse_text(triton.to_text(message), triton.model_config_class()) == message
        assert triton.to_text(message) in text  # the file is the message (after its comment header)
        [source] = scan_repository(out)
        assert source.batching == batching
        assert message.HasField("dynamic_batching") == batching.enabled


def test_triton_config_escapes_names():
    """A name with a quote, a backslash or a newline is written as protobuf escapes it and reads back equal."""
    from stages.serve import triton
    from stages.serve.config import BatchSettings

    info = pkg.ModelInfo(proto=None, props={}, opsets={}, contrib_ops={}, had_external_data=False,
                         inputs=[{"name": 'in"put\\', "triton_dtype": "TYPE_FP32", "dims": ["batch", 4], "shape": [-1, 4]}],
                         outputs=[{"name": "lo\ngits", "triton_dtype": "TYPE_FP32", "dims": ["batch", 3], "shape": [-1, 3]}])
    doc = {"task": "classification", "outputs": [{"name": "lo\ngits"}]}
    text = pkg.triton_config(doc, info, 'my "model" \\ 1', BatchSettings(), "labels.txt")
    config = triton.parse_text(text, triton.model_config_class())
    assert config.name == 'my "model" \\ 1' and config.input[0].name == 'in"put\\'
    assert config.output[0].name == "lo\ngits" and config.output[0].label_filename == "labels.txt"
    assert 'name: "my \\"model\\" \\\\ 1"' in text, text


def test_onnx_pipelines_server_serves_the_triton_repository(triton_repo, bundle):
    """`pipeline serve --model-repository` on what `pipeline package --format triton` wrote, over HTTP."""
    import socket
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", "--model-repository", str(triton_repo),
                               "--port", str(port), "--device", "cpu"], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                if httpx.get(f"{base}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "server did not become ready"
            time.sleep(0.2)
        meta = httpx.get(f"{base}/v2/models/tiny").json()
        assert meta["versions"] == ["3"] and meta["inputs"][0]["shape"] == [-1, 1, 8, 8]
        samples = json.loads((bundle / "samples.json").read_text())["samples"][:5]
        x = ModelMeta.read(bundle / "model.onnx").feed(np.asarray([s["input"] for s in samples], np.float32))["input"]
        r = httpx.post(f"{base}/v2/models/tiny/versions/3/infer", timeout=30, json={"inputs": [
            {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]})
        assert r.status_code == 200, r.text
        out = r.json()["outputs"][0]
        np.testing.assert_allclose(np.asarray(out["data"], np.float32).reshape(out["shape"]),
                                   [s["expected"]["outputs"]["logits"] for s in samples], atol=1e-4)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_kserve_manifest_has_the_required_fields(exported, tiny_yaml, tmp_path):
    out = tmp_path / "kserve"
    code, text = cli("package", "--recipe", str(tiny_yaml), "--workdir", str(exported.root), "--output", str(out),
                     "--format", "kserve", "--storage-uri", "s3://models/tiny", "--name", "tiny-digits")
    assert code == 0, text
    assert sorted(p.name for p in out.iterdir()) == ["inference-service.yaml", "model.onnx"]
    doc = yaml.safe_load((out / "inference-service.yaml").read_text())
    assert doc["apiVersion"] == "serving.kserve.io/v1beta1" and doc["kind"] == "InferenceService"
    assert doc["metadata"]["name"] == "tiny-digits"
    model = doc["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "onnx" and model["protocolVersion"] == "v2"
    assert model["storageUri"] == "s3://models/tiny"


# --- bad input (the registry path is tested in test_pipeline_e2e.py, against its store) ----------------------------------------------------------

@pytest.fixture(scope="module")
def contrib_model(tmp_path_factory) -> Path:
    """A real, loadable model that needs a com.microsoft contrib operator (FusedMatMul)."""
    import onnx
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3], np.ones(12, np.float32).tolist())
    graph = helper.make_graph([helper.make_node("FusedMatMul", ["x", "w"], ["logits"], domain="com.microsoft", alpha=1.0)],
                              "contrib", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])], [w])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    proto.ir_version = 8  # what ONNX Runtime reads; onnx.helper writes its newest
    proto.metadata_props.add(key="labels", value='["a", "b", "c"]')
    # It says how to feed it: as is. A file that says nothing is refused (stages.onnx_model).
    proto.metadata_props.add(key="preprocessing", value=json.dumps(NO_PREPROCESSING))
    path = tmp_path_factory.mktemp("contrib") / "contrib.onnx"
    onnx.save(proto, str(path))
    return path


def test_contrib_ops_are_refused_unless_allowed_and_then_stated(contrib_model, tiny_yaml, tmp_path):
    args = ["package", "--recipe", str(tiny_yaml), "--model", str(contrib_model), "--samples", "0"]
    code, text = cli(*args, "--output", str(tmp_path / "refused"))
    assert code == 2 and text.startswith("error: ") and "com.microsoft: FusedMatMul" in text
    assert "--allow-contrib-ops" in text and not (tmp_path / "refused").exists()
    code, text = cli(*args, "--output", str(tmp_path / "allowed"), "--allow-contrib-ops")
    assert code == 0, text
    readme = (tmp_path / "allowed" / "README.md").read_text()
    assert "contrib operators (com.microsoft: FusedMatMul)" in readme
    assert json.loads((tmp_path / "allowed" / "model.json").read_text())["model"]["non_standard_ops"] == \
        {"com.microsoft": ["FusedMatMul"]}


@pytest.mark.parametrize("args, message", [
    (["--model", "no/such/model.onnx"], "model file 'no/such/model.onnx' not found"),
    (["--format", "kserve"], "--storage-uri is required for --format kserve"),
    (["--format", "kserve", "--storage-uri", "bucket/path"], "--storage-uri must be a URI"),
    (["--samples", "many"], "--samples must be a count >= 0 or 'all'"),
    (["--output", "{nonempty}"], "exists and is not empty; choose another --output, or pass --overwrite"),
])
def test_bad_input_gets_one_clear_error(args, message, exported, tiny_yaml, tmp_path):
    nonempty = tmp_path / "taken"
    nonempty.mkdir()
    (nonempty / "keep.txt").write_text("mine")
    args = [a.format(nonempty=nonempty) for a in args]
    if "--output" not in args:
        args += ["--output", str(tmp_path / "out")]
    code, text = cli("package", "--recipe", str(tiny_yaml), "--workdir", str(exported.root), *args)
    assert code == 2  # each is a usage error: the command must change
    assert text.startswith("error: ") and message in text, text
    assert "Traceback" not in text and len(text.strip().splitlines()) == 1, text
    assert (nonempty / "keep.txt").read_text() == "mine" and not (tmp_path / "out").exists()


def test_overwrite_replaces_a_non_empty_output(exported, tiny_yaml, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    code, text = cli("package", "--recipe", str(tiny_yaml), "--workdir", str(exported.root), "--output", str(out),
                     "--samples", "2", "--overwrite")
    assert code == 0, text
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "model.json", "model.onnx", "samples.json"]
