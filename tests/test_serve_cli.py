"""`pipeline serve` as a user runs it: a Triton-layout repository served by the real CLI in a
subprocess, Triton's own Python HTTP client against it (from .venv-triton, see the Makefile),
graceful shutdown with a request in flight, and --require-gpu refusing on a machine without CUDA."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.test_serve import batch, free_port, onnx_path, reference, request_body  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
TRITON_PYTHON = ROOT / ".venv-triton" / "bin" / "python"
SLOW_PBTXT = """name: "slow"
max_batch_size: 4
dynamic_batching { max_queue_delay_microseconds: 1500000 }  # a lone request waits 1.5 s for company
"""


def cli(*args: str) -> list[str]:
    """`pipeline serve ARGS`, gRPC off unless ARGS say --grpc-port (parallel test sessions must not all
    bind gRPC's default port 8001)."""
    grpc = [] if "--grpc-port" in args else ["--grpc-port", "0"]
    return [sys.executable, "-m", "pipeline.cli", "serve", *args, *grpc, "--recipe",
            str(ROOT / "configs" / "digits-cnn.yaml")]


@pytest.fixture(scope="module")
def repo_server(tmp_path_factory, onnx_path):
    """A repository of two models plus a runs:/ model (fetched into TMPDIR's onnx-pipeline-serve-*), as
    `pipeline serve` serves them; yields (base URL, port, process, TMPDIR)."""
    import httpx
    import mlflow

    repo = tmp_path_factory.mktemp("repository")
    for name in ("digits", "slow"):
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "1" / "model.onnx").write_bytes(onnx_path.read_bytes())
    (repo / "slow" / "config.pbtxt").write_text(SLOW_PBTXT)
    # A run in the store the server will read (MLFLOW_TRACKING_URI: conftest's temporary store, unless a
    # test set another; mlflow's own current URI may differ, so the client is told).
    store = os.environ["MLFLOW_TRACKING_URI"]
    client = mlflow.MlflowClient(tracking_uri=store)
    run_id = client.create_run(client.get_experiment_by_name("Default").experiment_id).info.run_id
    client.log_artifact(run_id, str(onnx_path))
    client.set_terminated(run_id)
    tmp = tmp_path_factory.mktemp("tmpdir")
    port = free_port()
    proc = subprocess.Popen(cli("--model-repository", str(repo), "--model", f"runs:/{run_id}/model.onnx",
                                "--port", str(port)), cwd=ROOT, env={**os.environ, "MLFLOW_TRACKING_URI": store, "TMPDIR": str(tmp)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(f"{base}/v2/health/ready", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.time() < deadline, "server did not become ready"
        time.sleep(0.2)
    yield base, port, proc, tmp
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_cli_serves_a_repository_of_two_models(repo_server, reference):
    import httpx

    base, _, _, _ = repo_server
    x = batch(3, seed=5)
    for name in ("digits", "slow"):
        meta = httpx.get(f"{base}/v2/models/{name}").json()
        assert meta["name"] == name and meta["versions"] == ["1"]
        assert meta["parameters"]["execution_provider"] == "CPUExecutionProvider"
        assert meta["parameters"]["model_repository"] == repo_server_dir_name(meta)
        # No absolute server path anywhere in the metadata (issue 14: it exposed model_path).
        assert not [v for v in meta["parameters"].values() if isinstance(v, str) and v.startswith("/")], meta
        r = httpx.post(f"{base}/v2/models/{name}/infer", json=request_body(x), timeout=10)
        assert r.status_code == 200, r.text
        out = r.json()["outputs"][0]
        np.testing.assert_allclose(np.asarray(out["data"], np.float32).reshape(3, 10), reference(x), atol=1e-5)


@pytest.mark.skipif(not TRITON_PYTHON.exists(), reason="needs .venv-triton with tritonclient[http]: run `make test`")
def test_tritons_python_client_in_binary_mode(repo_server, reference, tmp_path):
    _, port, _, _ = repo_server
    x = batch(2, seed=9)
    np.save(tmp_path / "x.npy", x)
    p = subprocess.run([str(TRITON_PYTHON), str(ROOT / "tests" / "triton_client.py"), "--url", f"127.0.0.1:{port}",
                        "--model", "digits", "--input", str(tmp_path / "x.npy")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert got["live"] and got["ready"] and got["model_ready"]
    assert "binary_tensor_data" in got["server"]["extensions"]
    assert got["metadata"]["inputs"][0] == {"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}
    assert got["id"] == "triton-1" and got["binary"]
    np.testing.assert_allclose(np.asarray(got["output"], np.float32), reference(x), atol=1e-5)
    np.testing.assert_allclose(np.asarray(got["output_unnamed"], np.float32), reference(x), atol=1e-5)


def repo_server_dir_name(meta) -> str:
    return meta["parameters"]["model_repository"].rsplit("/", 1)[-1]


def test_sigterm_lets_the_in_flight_request_finish(repo_server, reference):
    # Runs last in this module: it stops the server.
    import httpx

    base, _, proc, tmp = repo_server
    assert list(tmp.glob("onnx-pipeline-serve-*")), "the runs:/ model's download folder exists while serving"
    x = batch(1, seed=11)
    answer = {}

    def call():
        answer["r"] = httpx.post(f"{base}/v2/models/slow/infer", json=request_body(x), timeout=30)

    caller = threading.Thread(target=call)
    started = time.monotonic()
    caller.start()
    time.sleep(0.5)  # the request now waits in the slow model's batch queue (1.5 s delay)
    proc.send_signal(signal.SIGTERM)
    caller.join(timeout=30)
    r = answer["r"]
    assert r.status_code == 200, r.text
    assert time.monotonic() - started >= 1.4  # it really was in flight when SIGTERM came
    out = r.json()["outputs"][0]
    np.testing.assert_allclose(np.asarray(out["data"], np.float32).reshape(1, 10), reference(x), atol=1e-5)
    # uvicorn re-raises SIGTERM once it has shut down; the CLI ends through its normal exit path with 143.
    assert proc.wait(timeout=30) == 143
    log = proc.stdout.read()
    assert "Traceback" not in log and "Finished server process" in log, log
    # The runs:/ (models:/) download folder went with the server (issue 14: it stayed after SIGTERM).
    assert not list(tmp.glob("onnx-pipeline-serve-*")), log


def _cuda_usable() -> bool:
    from stages.sessions import cuda_problem

    return cuda_problem() is None


@pytest.mark.parametrize("workers", ["1", "2"])
def test_the_same_model_twice_is_one_usage_error_before_anything_starts(onnx_path, workers):
    p = subprocess.run(cli("--model", str(onnx_path), "--model", str(onnx_path), "--workers", workers,
                           "--port", str(free_port()), "--grpc-port", "0"),
                       cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ})
    assert p.returncode == 2, p.stdout + p.stderr
    assert f"model {onnx_path.stem.split('.')[0]!r} version '1' is given twice" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.skipif(_cuda_usable(), reason="CUDA is usable here: --require-gpu would rightly start")
def test_require_gpu_refuses_without_cuda(onnx_path):
    p = subprocess.run(cli("--model", str(onnx_path), "--require-gpu", "--port", str(free_port())), cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env={**os.environ})
    assert p.returncode == 1, p.stdout + p.stderr
    lines = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "--require-gpu: CUDAExecutionProvider is not available" in lines[0], p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.skipif(not _cuda_usable(), reason="needs a CUDA GPU (this machine has none): run on the GPU machine")
def test_cuda_provider_with_io_binding_matches_cpu(onnx_path, reference):
    from stages.serve.config import RuntimeSettings
    from stages.serve.protocol import Tensor
    from stages.serve.runtime import load_model

    runtime = load_model(onnx_path, "digits", runtime=RuntimeSettings(device="cuda", require_gpu=True),
                         warm_batch_sizes=(1, 8, 64))
    assert runtime.provider == "CUDAExecutionProvider" and runtime.io_binding
    x = batch(8, seed=3)
    (out,) = runtime.infer([Tensor("input", x)])
    np.testing.assert_allclose(out.array, reference(x), atol=1e-4)
