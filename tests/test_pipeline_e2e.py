"""`pipeline run` end to end on a tiny recipe against a temporary MLflow store, then `pipeline serve`
of the registered champion over real HTTP on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import ROOT

STAGES = ["prepare", "train", "evaluate", "export", "quantize", "benchmark", "register"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("store")
    return f"sqlite:///{path}/mlflow.db"


@pytest.fixture(scope="module")
def pipeline_run(store, tiny_yaml, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("e2e-run")
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    p = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--recipe", str(tiny_yaml), "--workdir", str(workdir)],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return workdir, p


@pytest.fixture(scope="module")
def client(store, pipeline_run):
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(store)
    mlflow.set_registry_uri(store)
    return MlflowClient(store, store)


def test_run_prints_progress_and_a_summary_table(pipeline_run):
    _, p = pipeline_run
    for stage in STAGES:
        assert f"▶ {stage}" in p.stderr and f"✔ {stage}" in p.stderr
        assert stage in p.stdout  # the summary table
    assert "key metric" in p.stdout


def test_one_parent_run_with_a_nested_run_per_stage(client):
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.info.run_name == "pipeline"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["git.commit"]
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == set(STAGES)
    assert all(r.info.status == "FINISHED" for r in children.values())
    # live per-epoch metrics, one point per epoch
    history = client.get_metric_history(children["train"].info.run_id, "val_accuracy")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert children["evaluate"].data.metrics["test_accuracy"] > 0.8
    assert "accuracy.int8-static" in children["quantize"].data.metrics
    # the dataset is an MLflow dataset input with its digest
    inputs = children["prepare"].inputs.dataset_inputs
    assert inputs and inputs[0].dataset.name == "digits"
    # the providers ONNX Runtime actually used are on record, not only the requested ones
    assert "CPUExecutionProvider" in children["benchmark"].data.tags["providers.active"]
    assert children["register"].data.tags["providers.active"]
    artifacts = {a.path for a in client.list_artifacts(children["export"].info.run_id)}
    assert "model.onnx" in artifacts


def test_registered_version_has_aliases_lineage_and_the_onnx_flavor(client, pipeline_run):
    workdir, _ = pipeline_run
    mv = client.get_model_version_by_alias("tiny", "candidate")
    registration = json.loads((workdir / "registration.json").read_text())
    assert registration["version"] == str(mv.version)
    assert mv.tags["variant"] == registration["variant"]
    assert mv.tags["pipeline_run_id"] and mv.tags["training_run_id"] and mv.tags["dataset_sha256"]
    assert "champion" in mv.aliases or registration["gate_passed"] is False
    # Measured and registered with the sessions the recipe's serve.runtime builds, on the provider chosen.
    from stages.sessions import default_intra_op_threads

    assert registration["session"] == {"device": "cpu", "intra_op_threads": default_intra_op_threads(),
                                       "inter_op_threads": 1, "allow_spinning": True}
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(f"models:/tiny/{mv.version}"))
    mlmodel = (local / "MLmodel").read_text()
    assert "onnx:" in mlmodel and "signature:" in mlmodel
    assert list(local.glob("*.onnx")) and not list(local.glob("*.data"))


def test_package_the_champion_for_apps(store, pipeline_run, client, tiny_yaml, tmp_path, monkeypatch):
    """`pipeline package` from the registry (its default source), in-process against this module's store."""
    from tests.test_package import cli

    workdir, _ = pipeline_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    code, text = cli("package", "--recipe", str(tiny_yaml), "--model", "models:/tiny@candidate", "--workdir",
                     str(workdir), "--output", str(tmp_path / "bundle"), "--samples", "4")
    assert code == 0, text
    meta = json.loads((tmp_path / "bundle" / "model.json").read_text())
    registration = json.loads((workdir / "registration.json").read_text())
    assert (meta["lineage"]["registered_name"], meta["lineage"]["registered_version"]) == ("tiny", registration["version"])
    assert meta["lineage"]["source"] == "models:/tiny@candidate" and meta["samples"]["count"] == 4
    assert meta["model"]["variant"] == registration["variant"]
    code, text = cli("package", "--recipe", str(tiny_yaml), "--model", "models:/tiny@no-such-alias",
                     "--output", str(tmp_path / "none"))
    assert code == 2 and text.startswith("error: cannot resolve 'models:/tiny@no-such-alias'"), text
    assert len(text.strip().splitlines()) == 1 and not (tmp_path / "none").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_the_champion_over_http(store, pipeline_run, client):
    import onnxruntime as ort

    workdir, _ = pipeline_run
    variant = json.loads((workdir / "registration.json").read_text())["variant"]
    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    server = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", "--model", "models:/tiny@candidate",
                               "--port", str(port), "--recipe", str(ROOT / "configs" / "digits-cnn.yaml")],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            assert server.poll() is None, server.stdout.read()
            try:
                if httpx.get(f"{base}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        else:
            pytest.fail("server did not become ready")
        meta = httpx.get(f"{base}/v2/models/tiny").json()
        assert meta["inputs"][0]["shape"] == [-1, 1, 8, 8]
        params = json.dumps(meta)
        assert "registered_version" in params and "CPUExecutionProvider" in params

        # The served file takes raw pixels (0..16) and normalizes them itself, as its metadata says.
        props = meta["parameters"]
        assert json.loads(props["preprocessing"])["applied_in_graph"] is True and props["input.dtype"] == "float32"
        x = np.load(workdir / "data.npz")["x_test"][:3].astype(np.float32)
        body = {"id": "e2e", "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                         "data": x.flatten().tolist()}]}
        r = httpx.post(f"{base}/v2/models/tiny/infer", json=body, timeout=10)
        assert r.status_code == 200, r.text
        out = r.json()["outputs"][0]
        expected = ort.InferenceSession(str(workdir / ("model.onnx" if variant == "fp32" else f"model.{variant}.onnx")),
                                        providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
        np.testing.assert_allclose(np.asarray(out["data"], np.float32).reshape(out["shape"]), expected, atol=1e-4)

        bad = httpx.post(f"{base}/v2/models/tiny/infer", content=b"{not json", timeout=10)
        assert bad.status_code == 400 and "JSON" in bad.json()["error"]
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_failing_stage_fails_its_runs_and_registers_nothing(tmp_path, tiny_yaml):
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path}/mlflow.db"
    # Zero tolerance: ONNX Runtime and PyTorch differ in the last float bits, so validation must refuse.
    p = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--recipe", str(tiny_yaml), "--workdir",
                        str(tmp_path / "run"), "--set", "export.atol=0", "--set", "export.rtol=0",
                        "--set", "train.epochs=1"],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "MLFLOW_TRACKING_URI": store},
                       timeout=600)
    assert p.returncode == 1
    assert "stage export failed" in p.stderr and "output 'logits' max |diff|" in p.stderr
    assert "Traceback" not in p.stderr
    assert "failed" in p.stdout  # the summary table shows where it stopped
    assert not (tmp_path / "run" / "model.onnx").exists()
    client = MlflowClient(store, store)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("tiny").experiment_id])}
    assert runs["pipeline"].info.status == "FAILED" and runs["export"].info.status == "FAILED"
    assert runs["train"].info.status == "FINISHED" and "register" not in runs
    assert not client.search_registered_models()
