"""serve across processes and under overload: `pipeline serve --workers 2` on one port (both answer,
/metrics sums them, readiness waits for all, a killed worker is restarted, SIGTERM stops all), the
threads divided among workers, a small request not starved by a 32k-row one, the bounded queue
(503 + Retry-After, counted), and the serving path without torch.

Models are built with onnx.helper (no torch): a tiny dense net whose batch-64 run takes about a
millisecond, so a 32k-row request is ~0.5 s of compute, long next to one batch.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from stages.serve.config import BatchSettings, RuntimeSettings, ServeConfig, TransportSettings
from stages.sessions import SessionSettings

ROOT = Path(__file__).resolve().parents[1]
WIDTH = 256  # features of the dense net: batch 64 ~ 1 ms of compute on one core here


def dense_onnx(path: Path, width: int = WIDTH, layers: int = 3) -> Path:
    """x [N, width] -> Relu(x W_i) ... -> y [N, width]: row-wise, dynamic batch, float32."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, last = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes += [helper.make_node("MatMul", [last, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Relu", [f"m{i}"], [f"r{i}" if i < layers - 1 else "y"])]
        last = f"r{i}"
    graph = helper.make_graph(nodes, "dense", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def dense_path(tmp_path_factory) -> Path:
    return dense_onnx(tmp_path_factory.mktemp("dense") / "dense.onnx")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def body(x: np.ndarray) -> dict:
    return {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}


def grpc_infer(port: int, x: np.ndarray) -> np.ndarray:
    """ModelInfer on model "dense" over a new gRPC channel, raw contents both ways."""
    import grpc

    from stages.serve import triton
    from stages.serve.protocol import decode_binary, tensor_bytes

    request = triton.message_class("inference.ModelInferRequest")(model_name="dense")
    request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(tensor_bytes(x))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        rpc = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                  request_serializer=lambda m: m.SerializeToString(),
                                  response_deserializer=triton.message_class("inference.ModelInferResponse").FromString)
        response = rpc(request, timeout=10)
    out = response.outputs[0]
    return decode_binary(memoryview(response.raw_output_contents[0]), out.datatype, list(out.shape), "y")


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    import httpx

    deadline = time.time() + timeout
    while True:
        assert proc.poll() is None, f"server exited {proc.returncode}: {proc.stdout.read() if proc.stdout else ''}"
        try:
            if httpx.get(f"{base}/v2/health/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.time() < deadline, "server did not become ready"
        time.sleep(0.1)


def success_count(base: str) -> float:
    import httpx

    text = httpx.get(f"{base}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("onnx_pipeline_inference_requests_total{") and 'outcome="success"' in line)


def maps_torch(pid: int) -> bool:
    """Whether process ``pid`` has torch's shared library loaded (it imported torch)."""
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


# --- threads divided among workers (the session factory's rule) --------------------------------------

def test_threads_are_divided_among_workers():
    one = SessionSettings().divided(2, cores=2)
    assert (one.intra_op_threads, one.allow_spinning) == (1, False)  # 2 workers x 1 thread on 2 cores
    assert SessionSettings().divided(2, cores=16).intra_op_threads == 7  # 8 cores each, one kept for the event loop
    assert SessionSettings().divided(16, cores=16).intra_op_threads == 1
    assert SessionSettings(intra_op_threads=2, allow_spinning=True).divided(2, cores=4).intra_op_threads == 2
    with pytest.raises(ValueError, match=r"2 workers x 3 threads exceed the 4 cores; set it to at most 2"):
        SessionSettings(intra_op_threads=3).divided(2, cores=4)


def test_workers_key_is_validated_and_defaults_to_one_per_core():
    from stages.serve.workers import DEFAULT_MAX_WORKERS, default_workers, resolve_workers

    assert ServeConfig().transport.workers == 0
    assert resolve_workers(ServeConfig()) == min(os.cpu_count(), DEFAULT_MAX_WORKERS) or os.cpu_count() is None
    assert default_workers(64) == DEFAULT_MAX_WORKERS and default_workers(1) == 1
    with pytest.raises(ValueError, match=r"`serve.transport.workers` must be an integer between 0 and 256"):
        ServeConfig.from_dict({"transport": {"workers": -1}})
    with pytest.raises(ValueError, match=r"`serve.batching.max_queue_size` must be an integer >= 0"):
        ServeConfig.from_dict({"batching": {"max_queue_size": -3}})


# --- two workers on one port ------------------------------------------------------------------------

@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_two_workers_share_the_port_sum_metrics_restart_and_stop(dense_path, tmp_path):
    import httpx
    import psutil

    port, grpc_port = free_port(), free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", "--model", str(dense_path), "--name", "dense",
                             "--port", str(port), "--grpc-port", str(grpc_port), "--workers", "2"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_ready(base, proc)
        workers = psutil.Process(proc.pid).children()
        assert len(workers) == 2
        x = np.random.default_rng(1).standard_normal((3, WIDTH)).astype(np.float32)
        sent = 0
        for _ in range(12):  # a new connection each: SO_REUSEPORT spreads them over the workers
            r = httpx.post(f"{base}/v2/models/dense/infer", json=body(x), timeout=10)
            assert r.status_code == 200, r.text
            sent += 1
        for _ in range(4):  # the workers share the gRPC port too, with the same counters
            y = grpc_infer(grpc_port, x)
            np.testing.assert_allclose(y, grpc_infer(grpc_port, x))
            sent += 2
        # Every worker answers /metrics with the sum over all of them.
        assert {success_count(base) for _ in range(6)} == {sent}
        # Neither the supervisor nor a worker imported torch (the serving path is slim).
        assert not any(maps_torch(p) for p in (proc.pid, *(w.pid for w in workers)))

        # Kill one worker: the other keeps answering; the supervisor starts a new one; the dead one's
        # counts stay in the sum (counters never go backwards).
        workers[0].send_signal(signal.SIGKILL)
        workers[0].wait(10)
        for _ in range(6):
            r = httpx.post(f"{base}/v2/models/dense/infer", json=body(x), timeout=10)
            assert r.status_code == 200, r.text
            sent += 1
        deadline = time.time() + 60
        while True:
            now = [w for w in psutil.Process(proc.pid).children() if w.is_running()]
            if len(now) == 2 and workers[0].pid not in {w.pid for w in now}:
                try:
                    if httpx.get(f"{base}/v2/health/ready", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
            assert time.time() < deadline and proc.poll() is None, "the killed worker was not replaced"
            time.sleep(0.1)
        assert success_count(base) == sent

        proc.send_signal(signal.SIGTERM)  # a graceful stop of every worker; 143 as a one-process server
        assert proc.wait(30) == 143
        assert not any(w.is_running() for w in now)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_worker_that_cannot_load_fails_the_start_with_its_message(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "serve", "--model", str(bad), "--port", str(free_port()),
                        "--workers", "2"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "is not a valid ONNX model" in r.stderr and "Traceback" not in r.stderr


def test_threads_that_do_not_fit_the_cores_are_refused(dense_path, tmp_path):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "serve", "--model", str(dense_path), "--workers", "2",
                        "--grpc-port", "0", "--set", f"serve.runtime.intra_op_threads={cores}"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2
    assert "`serve.runtime.intra_op_threads` is" in r.stderr and "exceed the" in r.stderr


# --- fair and bounded ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dense_runtime(dense_path):
    from stages.serve.runtime import load_model

    return load_model(dense_path, "dense", runtime=RuntimeSettings(device="cpu", intra_op_threads=1),
                      warm_batch_sizes=(1, 64))


def _batch_seconds(runtime, rows: int = 64) -> float:
    x = {"x": np.ones((rows, WIDTH), np.float32)}
    times = []
    for _ in range(15):
        t = time.perf_counter()
        runtime.run(x)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def test_a_small_request_is_not_starved_by_a_large_one(dense_runtime):
    """A 1-row request sent while a 32k-row request runs is answered within a few batch times (the large
    one is served in max_batch_size pieces, round robin), long before the large one; the large one's
    rows come back whole and in order."""
    from stages.serve.batcher import Batcher

    big = np.random.default_rng(2).standard_normal((32768, WIDTH)).astype(np.float32)
    small = np.random.default_rng(3).standard_normal((1, WIDTH)).astype(np.float32)
    batch_s = _batch_seconds(dense_runtime)

    async def scenario():
        batcher = Batcher(dense_runtime, BatchSettings(max_batch_size=64)).start()
        try:
            big_task = asyncio.ensure_future(batcher.infer({"x": big}))
            while batcher._started == 0:  # the large request has begun
                await asyncio.sleep(0.001)
            await asyncio.sleep(5 * batch_s)
            t = time.perf_counter()
            out_small = await batcher.infer({"x": small})
            small_s = time.perf_counter() - t
            big_done_first = big_task.done()
            out_big = await big_task
            return small_s, big_done_first, out_small, out_big, time.perf_counter() - t
        finally:
            batcher.stop(10)

    small_s, big_done_first, out_small, out_big, big_rest_s = asyncio.run(scenario())
    assert not big_done_first, "the small request waited for the whole large one"
    # Bounded by batch compute times, not by the large request (~512 batches): a piece of the large
    # one in flight, then the small one's own batch, with room for a busy shared machine.
    assert small_s < max(20 * batch_s, 0.05) < big_rest_s, (small_s, batch_s, big_rest_s)
    np.testing.assert_allclose(out_small["y"], dense_runtime.run({"x": small})["y"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out_big["y"], dense_runtime.run({"x": big})["y"], rtol=1e-4, atol=1e-4)


def test_bounded_queue_refuses_with_503_retry_after_and_counts_it(dense_runtime):
    """Batching off and a 32k-row request running: the small requests behind it wait, not started; past
    max_queue_size (2) they are answered 503 with Retry-After at once, and counted as rejected."""
    import httpx

    from tests.test_serve import running_server

    config = ServeConfig(transport=TransportSettings(port=free_port(), max_request_mb=64),
                         batching=BatchSettings(enabled=False, max_queue_size=2))
    big = np.zeros((32768, WIDTH), np.float32)
    small = np.zeros((1, WIDTH), np.float32)

    async def flood(base: str):
        limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
        async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
            def post(x):
                raw = x.tobytes()
                doc = json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                              "parameters": {"binary_data_size": len(raw)}}]}).encode()
                return client.post("/v2/models/dense/infer", content=doc + raw,
                                   headers={"inference-header-content-length": str(len(doc))})

            await asyncio.gather(*(client.get("/v2/health/live") for _ in range(14)))  # connections open
            big_task = asyncio.ensure_future(post(big))  # runs whole (batching off): the queue fills behind it
            while "onnx_pipeline_queue_duration_seconds_count" not in (text := (await client.get("/metrics")).text) \
                    or _metric(text, "onnx_pipeline_queue_duration_seconds_count") < 1:  # until it has started
                assert not big_task.done(), big_task.result().text
                await asyncio.sleep(0.01)
            answers = await asyncio.gather(*(post(small) for _ in range(12)))
            big_running = not big_task.done()
            assert (await big_task).status_code == 200
            return answers, big_running, (await client.get("/metrics")).text

    with running_server([dense_runtime], config) as base:
        answers, big_running, metrics = asyncio.run(flood(base))
    refused = [r for r in answers if r.status_code == 503]
    assert all(r.status_code in (200, 503) for r in answers), [r.status_code for r in answers]
    if big_running:  # the large request outlasted the small ones: at most 2 of them could wait
        assert len(refused) >= len(answers) - 2, [r.status_code for r in answers]
    assert refused, [r.status_code for r in answers]
    assert refused[0].headers["retry-after"] == "1" and "max_queue_size" in refused[0].json()["error"]
    line = next(ln for ln in metrics.splitlines() if 'outcome="rejected"' in ln and not ln.startswith("#"))
    assert float(line.rsplit(" ", 1)[1]) == len(refused)


def _metric(text: str, name: str) -> float:
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(name + "{"))


# --- slim serving -------------------------------------------------------------------------------------

SERVE_AND_REPORT = """
import json, os, signal, sys, threading, time, urllib.request
port, out, grpc_port = sys.argv[1], sys.argv[2], sys.argv[4]
def watch():
    while True:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status == 200:
                break
        except Exception:
            time.sleep(0.05)
    heavy = sorted(m for m in ("torch", "pipeline.config", "stages.train", "models", "mlflow", "sklearn")
                   if m in sys.modules)
    with open(out, "w") as f:
        json.dump(heavy, f)
    os.kill(os.getpid(), signal.SIGTERM)
threading.Thread(target=watch, daemon=True).start()
sys.argv = ["pipeline", "serve", "--model", sys.argv[3], "--port", port, "--grpc-port", grpc_port, "--workers", "1"]
from pipeline.cli import main
main()
"""


def test_serving_imports_no_torch_nor_the_training_stack(dense_path, tmp_path):
    """`pipeline serve` run from the repository root (so it reads the default recipe's serve section)
    until ready: torch, the recipe's stage configs and the model families are never imported."""
    out = tmp_path / "modules.json"
    r = subprocess.run([sys.executable, "-c", SERVE_AND_REPORT, str(free_port()), str(out), str(dense_path),
                        str(free_port())],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.is_file(), r.stderr
    assert json.loads(out.read_text()) == [], r.stderr


# --- the container image -----------------------------------------------------------------------------

def _pip_installs(text: str) -> list[str]:
    """Every `pip install` command of a Dockerfile (RUN lines joined) or of a README's bash blocks,
    with --no-cache-dir dropped (an image-size detail) and whitespace normalized."""
    joined = text.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        for part in line.split("&&"):
            if "pip install" in part:
                cmd = part.split("RUN", 1)[-1].split("#", 1)[0].replace("--no-cache-dir", "")
                out.append(" ".join(cmd.split()))
    return out


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles_install_the_readmes_slim_server(dockerfile):
    """No Docker engine here: nothing is built, but each image installs exactly what the README tells a
    user to install for a slim server (the serve extra, pinned by constraints.txt), and starts `pipeline serve`."""
    text = (ROOT / dockerfile).read_text()
    readme = (ROOT / "README.md").read_text()
    guide = readme[readme.index("### Serving at scale"):]
    guide = guide[:guide.index("\n### ", 5)]
    installs = _pip_installs(text)
    assert installs == ["python -m pip install -c constraints.txt '.[serve]'"], installs
    assert installs[0] in _pip_installs(guide)
    assert 'ENTRYPOINT ["pipeline", "serve", "--host", "0.0.0.0"' in text
    copied = " ".join(ln for ln in text.splitlines() if ln.startswith("COPY "))
    for path in ("pyproject.toml", "constraints.txt", "pipeline", "stages", "models"):
        assert f" {path}" in copied, path


def test_kserve_manifest_can_run_the_slim_server_image():
    from stages.package import kserve_manifest

    doc = {"lineage": {"source": "models:/digits-cnn@champion"}, "model": {"sha256": "abc"}}
    manifest = kserve_manifest("digits-cnn", "s3://bucket/m", doc, image="registry.example.com/onnx-pipeline-serve:0.1.0")
    container = manifest["spec"]["predictor"]["containers"][0]
    assert container["image"] == "registry.example.com/onnx-pipeline-serve:0.1.0"
    assert container["args"][:2] == ["--model", "/mnt/models/model.onnx"] and "--port" in container["args"]
    assert {"name": "STORAGE_URI", "value": "s3://bucket/m"} in container["env"]
    assert "model" not in manifest["spec"]["predictor"]  # a custom predictor, not KServe's ONNX runtime


def test_serve_takes_a_bundle_directory(tmp_path, dense_path):
    """`pipeline serve --model dist/NAME` serves the bundle's model.onnx under the bundle's name."""
    import shutil

    from pipeline.cli import _model_source

    bundle = tmp_path / "dense-bundle"
    bundle.mkdir()
    shutil.copy(dense_path, bundle / "model.onnx")
    source = _model_source(str(bundle), None)
    assert source.path == bundle / "model.onnx" and source.name == "dense-bundle"
