"""Load benchmark: onnx-pipeline's v2 server against a real Triton and `mlflow models serve`, same model, same load.

    .venv/bin/python benchmarks/serve_load.py                      # trains the digits CNN (~10 s), then ~8 min of load
    .venv/bin/python benchmarks/serve_load.py --onnx runs/digits-cnn/model.onnx --seconds 10 --json out.json
    .venv/bin/python benchmarks/serve_load.py --gpu-scaling        # on a GPU machine: workers 1..16 on CUDA, c=256

The model: unless ``--onnx`` is given, the default recipe's digits CNN (channels 32-64-64, hidden 128,
8x8x1 input, 10 classes) trained for 2 epochs on scikit-learn's bundled digits and exported with a
dynamic batch dim (the speed of serving does not depend on how well it is trained). The same file
is served, one server at a time, alone on the machine, each in its own process (session):

- ``ours-1w``: ``pipeline serve --workers 1``; ``ours-Nw``: ``--workers`` one per core (HTTP, and
  gRPC where ``pipeline serve`` has ``--grpc-port``);
- ``triton``: the real ``tritonserver`` binary that the ``nvidia-pytriton`` wheel ships (it has the
  Python backend only), serving a model repository whose plain Python-backend ``model.py`` runs
  onnxruntime with our server's thread settings (intra-op threads, spinning), dynamic batching on
  with the same max batch size and delay (HTTP and gRPC). Install it outside the repository::

      python3 -m venv ~/venvs/triton-server         # any directory outside the checkout
      ~/venvs/triton-server/bin/pip install nvidia-pytriton==0.7.0 onnxruntime==1.31.1

  and pass ``--triton-venv`` (or set ``TRITON_SERVER_VENV``); without it the Triton rows are skipped,
  saying so. Its Python stub needs the interpreter's ``libpython`` (found from that venv's python).
  (PyTriton's own proxy path adds ~2 ms per request and is not a fair peer: not used.)
- ``mlflow``: the file logged with the ONNX flavor into a temporary store, then
  ``mlflow models serve -m runs:/<id>/model --env-manager local``, its ``/invocations`` JSON.

The load generator is compiled, so it takes little of the 2 cores it shares with the server:
``wrk`` (HTTP/1.1 keep-alive, one thread, a Lua script for the POST body and the percentiles) and
``h2load`` (gRPC over HTTP/2, one thread, one stream per connection, per-request log for the
percentiles), both from Debian (``apt-get install wrk nghttp2-client``). Closed loop: C connections
each send the next request as soon as the previous answer arrived, for ``--seconds`` after a
one-second warm-up run that is not counted. The generator's own CPU is measured and reported
(``load cores``): what it took from the server. Without wrk the built-in asyncio generator is used
(and costs the server far more CPU); without h2load the gRPC rows are skipped.

Scenarios: one sample per request at concurrency 1, 8, 32 and 128, then 32 samples per request at
concurrency 8; HTTP for every server, gRPC for ours and Triton. Per cell: requests/s, samples/s, p50
and p99 latency, errors (non-2xx or broken connections), the server's CPU (cores, and microseconds
per request). The c=32 single-sample cell is repeated ``--repeat`` times, every server in turn, one
round after the other (the machine's noise is +-20-40% between runs): the table reports the medians.
Every server's HTTP answer is first checked against in-process ONNX Runtime. Goals of issue 13 are
checked at the end. ``uptime``'s load is printed before and after: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODEL_NAME = "digits"
INPUT, OUTPUT = "input", "logits"
GRPC_INFER = "/inference.GRPCInferenceService/ModelInfer"


# --- the model ----------------------------------------------------------------------------------

def train_digits_cnn(path: Path, epochs: int = 2) -> None:
    import torch
    from sklearn.datasets import load_digits

    import models

    torch.manual_seed(0)
    torch.set_num_threads(1)  # a tiny model trains no faster on more threads, and the machine is shared
    digits = load_digits()
    x = torch.tensor(digits.images[:, None], dtype=torch.float32)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(digits.target)
    model = models.build("cnn", models.cnn.Config(), (1, 8, 8), 10)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # the legacy exporter: one small static graph
    torch.onnx.export(model, (x[:2],), str(path), dynamo=False, input_names=[INPUT], output_names=[OUTPUT],
                      dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}, opset_version=17)


def in_process_samples_per_s(path: Path, batch: int, device: str, seconds: float = 2.0) -> float:
    import onnxruntime as ort

    from stages.sessions import ort_providers

    session = ort.InferenceSession(str(path), providers=ort_providers(device))  # ORT's default threads
    x = np.random.default_rng(0).standard_normal((batch, 1, 8, 8)).astype(np.float32)
    for _ in range(50):
        session.run(None, {INPUT: x})
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(20):
            session.run(None, {INPUT: x})
        n += 20
    return n * batch / (time.perf_counter() - start)


# --- the servers --------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(port: int, path: str, proc: subprocess.Popen, timeout: float = 180) -> float:
    """Seconds until ``path`` answered 200 (the server's cold start to ready)."""
    import httpx

    start = time.perf_counter()
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited ({proc.returncode}); see its log")
        try:
            if httpx.get(f"http://127.0.0.1:{port}{path}", timeout=1).status_code == 200:
                return time.perf_counter() - start
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"server on port {port} not ready after {timeout:.0f} s")


@dataclass
class Server:
    """A running server: its process (the leader of its own session), ports and request formats."""

    name: str
    proc: subprocess.Popen
    http_port: int
    http_path: str
    body: object  # x -> HTTP body bytes
    read: object  # HTTP answer bytes -> outputs
    grpc_port: int | None = None
    ready_s: float = 0.0


def serve_help() -> str:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "serve", "--help"], cwd=ROOT, capture_output=True,
                          text=True).stdout


def start_ours(name: str, onnx: Path, workers: int, log: Path, extra: list[str], grpc: bool) -> Server:
    port = free_port()
    grpc_port = free_port() if grpc else None
    cmd = [sys.executable, "-m", "pipeline.cli", "serve", "--model", str(onnx), "--name", MODEL_NAME, "--port",
           str(port), "--workers", str(workers), *(["--grpc-port", str(grpc_port)] if grpc_port else []), *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    ready = wait_http(port, "/v2/health/ready", proc)
    return Server(name, proc, port, f"/v2/models/{MODEL_NAME}/infer", v2_body, v2_outputs, grpc_port, ready)


TRITON_MODEL_PY = '''"""Triton Python backend: ONNX Runtime on the model file beside this one (written by serve_load.py)."""
import json
import os
import sys

sys.path.insert(0, {site!r})  # the stub's interpreter does not see the venv's site-packages otherwise

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = {intra}
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "{spin}")
        path = os.path.join(os.path.dirname(__file__), "model.onnx")
        self.session = ort.InferenceSession(path, opts, providers={providers!r})

    def execute(self, requests):
        xs = [pb_utils.get_input_tensor_by_name(r, "{input}").as_numpy() for r in requests]
        y = self.session.run(["{output}"], {{"{input}": xs[0] if len(xs) == 1 else np.concatenate(xs)}})[0]
        out, start = [], 0
        for x in xs:
            out.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("{output}", y[start:start + len(x)])]))
            start += len(x)
        return out
'''

TRITON_CONFIG = '''name: "{name}"
backend: "python"
max_batch_size: {max_batch}
input [{{ name: "{input}", data_type: TYPE_FP32, dims: [1, 8, 8] }}]
output [{{ name: "{output}", data_type: TYPE_FP32, dims: [10] }}]
dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}
instance_group [{{ count: 1, kind: {kind} }}]
'''


def triton_paths(venv: Path) -> dict:
    """tritonserver, its Python backend and stub, the site-packages and libpython it needs, from the venv."""
    py = venv / "bin" / "python"
    info = json.loads(subprocess.run([str(py), "-c", (
        "import json, sys, sysconfig, site; print(json.dumps({'site': site.getsitepackages()[0], "
        "'libdir': sysconfig.get_config_var('LIBDIR'), 'ver': f'{sys.version_info[0]}.{sys.version_info[1]}'}))")],
        capture_output=True, text=True, check=True).stdout)
    pkg = Path(info["site"]) / "pytriton" / "tritonserver"
    libs = Path(info["site"]) / "nvidia_pytriton.libs"
    return {"bin": pkg / "bin" / "tritonserver", "backend": pkg / "backends" / "python",
            "stub": pkg / "python_backend_stubs" / info["ver"] / "triton_python_backend_stub",
            "site": info["site"], "ld": [info["libdir"], str(libs)]}


def start_triton(venv: Path, onnx: Path, work: Path, log: Path, session: dict, max_batch: int, delay_ms: float,
                 device: str) -> Server:
    paths = triton_paths(venv)
    repo, backends = work / "triton-repo", work / "triton-backends" / "python"
    shutil.rmtree(repo, ignore_errors=True)
    (repo / MODEL_NAME / "1").mkdir(parents=True)
    backends.mkdir(parents=True, exist_ok=True)
    for src in (paths["backend"] / "libtriton_python.so", paths["backend"] / "triton_python_backend_utils.py",
                paths["stub"]):
        dst = backends / src.name
        if not dst.exists():
            shutil.copy(src, dst)
    shutil.copy(onnx, repo / MODEL_NAME / "1" / "model.onnx")
    cuda = device == "cuda"
    (repo / MODEL_NAME / "1" / "model.py").write_text(TRITON_MODEL_PY.format(
        site=paths["site"], intra=session["intra_op_threads"], spin="1" if session["allow_spinning"] else "0",
        providers=["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"],
        input=INPUT, output=OUTPUT))
    (repo / MODEL_NAME / "config.pbtxt").write_text(TRITON_CONFIG.format(
        name=MODEL_NAME, max_batch=max_batch, delay_us=int(delay_ms * 1000), input=INPUT, output=OUTPUT,
        kind="KIND_GPU" if cuda else "KIND_CPU"))
    http, grpc = free_port(), free_port()
    env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join([*paths["ld"], os.environ.get("LD_LIBRARY_PATH", "")])}
    cmd = [str(paths["bin"]), "--model-repository", str(repo), "--backend-directory", str(backends.parent),
           "--http-port", str(http), "--grpc-port", str(grpc), "--allow-metrics", "false", "--log-verbose", "0"]
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    ready = wait_http(http, "/v2/health/ready", proc)
    return Server("triton", proc, http, f"/v2/models/{MODEL_NAME}/infer", v2_body, v2_outputs, grpc, ready)


def start_mlflow(onnx: Path, store: Path, log: Path) -> Server:
    import mlflow
    import mlflow.onnx
    import onnx as onnx_lib
    from mlflow.models import infer_signature

    uri = f"sqlite:///{store}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("serve-load")
    x = np.zeros((1, 1, 8, 8), np.float32)
    with mlflow.start_run() as run:
        mlflow.onnx.log_model(onnx_lib.load(str(onnx)), name="model", input_example=x,
                              signature=infer_signature(x, np.zeros((1, 10), np.float32)))
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [str(BIN / "mlflow") if (BIN / "mlflow").exists() else (shutil.which("mlflow") or "mlflow"), "models",
           "serve", "-m", f"runs:/{run.info.run_id}/model", "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(cmd, cwd=store, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own group: mlflow forks a uvicorn child
    ready = wait_http(port, "/ping", proc)
    return Server("mlflow", proc, port, "/invocations", mlflow_body, mlflow_outputs, None, ready)


def cpu_seconds(session_leader: int) -> float:
    """User + system CPU seconds of every process in a session (Linux /proc; NaN elsewhere): what a
    server costs, robust to a busy machine in a way that requests/s is not."""
    if not Path("/proc/self/stat").exists():
        return float("nan")
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session_leader:  # field 6 of stat: the session id
            total += int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
    return total / os.sysconf("SC_CLK_TCK")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM) if os.getpgid(proc.pid) == proc.pid else proc.terminate()
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# --- request bodies -----------------------------------------------------------------------------

def v2_body(x: np.ndarray) -> bytes:
    return json.dumps({"inputs": [{"name": INPUT, "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()


def mlflow_body(x: np.ndarray) -> bytes:
    return json.dumps({"inputs": x.tolist()}).encode()


def v2_outputs(body: bytes) -> np.ndarray:
    out = json.loads(body)["outputs"][0]
    return np.asarray(out["data"], np.float32).reshape(out["shape"])


def mlflow_outputs(body: bytes) -> np.ndarray:
    pred = json.loads(body)["predictions"]
    if isinstance(pred, dict):  # {"logits": [...]} for a named output
        pred = next(iter(pred.values()))
    return np.asarray(pred, np.float32)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:  # a length-delimited protobuf field
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def grpc_infer_message(x: np.ndarray) -> bytes:
    """A KServe v2 ``ModelInferRequest`` (protobuf, written by hand: no generated code needed) with the
    input in ``raw_input_contents``, framed as one gRPC message (5-byte prefix)."""
    tensor = _field(1, INPUT.encode()) + _field(2, b"FP32") + _field(3, b"".join(_varint(d) for d in x.shape))
    request = _field(1, MODEL_NAME.encode()) + _field(5, tensor) + _field(7, np.ascontiguousarray(x, "<f4").tobytes())
    return b"\x00" + struct.pack(">I", len(request)) + request


def grpc_outputs(message: bytes) -> np.ndarray:
    """``raw_output_contents[0]`` of a framed ``ModelInferResponse`` as float32 (field 6)."""
    buf, i, raw = message[5:], 0, None
    while i < len(buf):
        key, i = _read_varint(buf, i)
        kind, number = key & 7, key >> 3
        if kind == 2:
            n, i = _read_varint(buf, i)
            if number == 6 and raw is None:
                raw = buf[i:i + n]
            i += n
        elif kind == 0:
            _, i = _read_varint(buf, i)
        else:
            raise ValueError(f"unexpected protobuf wire type {kind}")
    return np.frombuffer(raw or b"", "<f4")


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


# --- load generators ----------------------------------------------------------------------------

@dataclass
class Cell:
    server: str
    protocol: str
    scenario: str
    concurrency: int
    rows: int
    requests_per_s: float
    samples_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    server_cores: float  # CPU seconds the server's processes used per second of the cell
    cpu_us_per_request: float
    load_cores: float  # CPU seconds the load generator used per second
    runs: int = 1  # cells this row is the median of


WRK_SCRIPT = """
wrk.method = "POST"
local f = io.open(os.getenv("BODY_FILE"), "rb"); wrk.body = f:read("*a"); f:close()
wrk.headers["Content-Type"] = os.getenv("BODY_TYPE")
done = function(summary, latency, requests)
  local e = summary.errors
  io.stderr:write(string.format('WRK {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "errors": %d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout + e.status))
end
"""


def _child_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_wrk(port: int, path: str, body: bytes, content_type: str, concurrency: int, seconds: float,
            work: Path) -> tuple[dict, float]:
    (work / "body").write_bytes(body)
    (work / "post.lua").write_text(WRK_SCRIPT)
    env = {**os.environ, "BODY_FILE": str(work / "body"), "BODY_TYPE": content_type}
    url = f"http://127.0.0.1:{port}{path}"
    base = ["wrk", "-t1", f"-c{concurrency}", "-s", str(work / "post.lua"), "--timeout", "10s"]
    subprocess.run([*base, "-d1s", url], env=env, capture_output=True, timeout=60)  # warm-up, not counted
    cpu0 = _child_cpu()
    r = subprocess.run([*base, f"-d{seconds:g}s", url], env=env, capture_output=True, text=True, timeout=seconds + 60)
    line = next((ln for ln in r.stderr.splitlines() if ln.startswith("WRK ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed: {r.stdout[-500:]} {r.stderr[-500:]}")
    out = json.loads(line[4:])
    return {"requests": out["requests"], "seconds": out["duration_us"] / 1e6, "p50_ms": out["p50_us"] / 1000,
            "p99_ms": out["p99_us"] / 1000, "errors": out["errors"]}, (_child_cpu() - cpu0)


def run_h2load(port: int, message: bytes, concurrency: int, seconds: float, work: Path) -> tuple[dict, float]:
    (work / "grpc.bin").write_bytes(message)
    log = work / "h2load.log"
    log.unlink(missing_ok=True)
    cmd = ["h2load", "-t1", f"-c{concurrency}", "-m1", "-d", str(work / "grpc.bin"), "-H", "content-type: application/grpc",
           "-H", "te: trailers", "--warm-up-time=1", f"-D{seconds:g}", f"--log-file={log}",
           f"http://127.0.0.1:{port}{GRPC_INFER}"]
    cpu0 = _child_cpu()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    cpu = _child_cpu() - cpu0
    rows = [ln.split("\t") for ln in log.read_text().splitlines()] if log.is_file() else []
    lat = np.asarray([int(r_[2]) for r_ in rows if r_[1] == "200"], float) / 1000
    errors = sum(1 for r_ in rows if r_[1] != "200")
    for ln in r.stdout.splitlines():  # "requests: N total, N started, N done, N succeeded, N failed, N errored"
        if ln.startswith("requests:"):
            parts = ln.replace(",", "").split()
            errors += int(parts[parts.index("failed") - 1]) + int(parts[parts.index("errored") - 1])
    if not len(lat):
        raise RuntimeError(f"h2load got no answer: {r.stdout[-800:]} {r.stderr[-300:]}")
    return {"requests": len(lat), "seconds": seconds, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "errors": errors}, cpu * seconds / (seconds + 1)


def drive(server: Server, protocol: str, x: np.ndarray, concurrency: int, seconds: float, work: Path) -> Cell:
    cpu0, t0 = cpu_seconds(server.proc.pid), time.perf_counter()
    if protocol == "grpc":
        out, load_cpu = run_h2load(server.grpc_port, grpc_infer_message(x), concurrency, seconds, work)
    elif shutil.which("wrk"):
        out, load_cpu = run_wrk(server.http_port, server.http_path, server.body(x), "application/json", concurrency,
                                seconds, work)
    else:
        out, load_cpu = python_generator(server.http_port, server.http_path, server.body(x), concurrency, seconds)
    wall = time.perf_counter() - t0
    cpu = cpu_seconds(server.proc.pid) - cpu0  # warm-up included, like the wall time
    answered = out["requests"] * wall / max(out["seconds"], 1e-9)  # requests over the whole wall time, roughly
    rows = len(x)
    return Cell(server.name, protocol, f"c={concurrency}, {rows} sample{'s' if rows > 1 else ''}/request",
                concurrency, rows, out["requests"] / out["seconds"], out["requests"] * rows / out["seconds"],
                out["p50_ms"], out["p99_ms"], out["errors"], cpu / wall, cpu / max(answered, 1) * 1e6,
                load_cpu / max(out["seconds"], 1e-9))


# The fallback generator (no wrk): raw asyncio sockets, HTTP/1.1 keep-alive. It costs the server far
# more CPU than wrk does (tens of microseconds of Python per request), which the load-cores column shows.

async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    i = lower.find(b"content-length:")
    if i >= 0:
        n = int(lower[i + 15:lower.index(b"\r\n", i)])
        return status, await reader.readexactly(n)
    raise RuntimeError("response without Content-Length")


async def _connection(port, request, warm_until, stop_at, latencies, errors) -> None:
    reader = writer = None
    while time.perf_counter() < stop_at:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            t0 = time.perf_counter()
            writer.write(request)
            status, _ = await _read_response(reader)
            t1 = time.perf_counter()
            if t0 >= warm_until and t1 <= stop_at:
                (latencies.append(t1 - t0) if status == 200 else errors.append(status))
        except (OSError, asyncio.IncompleteReadError, RuntimeError, ValueError) as e:
            if time.perf_counter() >= warm_until:
                errors.append(type(e).__name__)
            if writer is not None:
                writer.close()
            reader = writer = None
            await asyncio.sleep(0.01)
    if writer is not None:
        writer.close()


def python_generator(port: int, path: str, body: bytes, concurrency: int, seconds: float) -> tuple[dict, float]:
    request = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    latencies: list[float] = []
    errors: list = []

    async def run():
        start = time.perf_counter()
        await asyncio.gather(*(_connection(port, request, start + 1, start + 1 + seconds, latencies, errors)
                               for _ in range(concurrency)))

    cpu0 = time.process_time()
    asyncio.run(run())
    lat = np.asarray(latencies or [np.nan]) * 1000
    return {"requests": len(latencies), "seconds": seconds, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "errors": len(errors)}, time.process_time() - cpu0


# --- main ---------------------------------------------------------------------------------------

def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def check_answers(server: Server, onnx: Path, device: str) -> None:
    import httpx
    import onnxruntime as ort

    check = np.random.default_rng(1).standard_normal((3, 1, 8, 8)).astype(np.float32)
    expected = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"]).run(None, {INPUT: check})[0]
    r = httpx.post(f"http://127.0.0.1:{server.http_port}{server.http_path}", content=server.body(check),
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 200, f"{server.name}: {r.status_code} {r.text[:300]}"
    # CUDA convolutions run in TF32 by default: ~1e-3 off the CPU's fp32 logits (seen on an H100).
    atol = 5e-3 if device == "cuda" else 1e-4
    np.testing.assert_allclose(server.read(r.content), expected, atol=atol, err_msg=f"{server.name} answers differently")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--onnx", type=Path, help="an .onnx model with input 'input' (N,1,8,8) [default: train one]")
    ap.add_argument("--seconds", type=float, default=6.0, help="measured seconds per cell (after 1 s warm-up)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--batch-rows", type=int, default=32, help="samples per request in the last scenario")
    ap.add_argument("--batch-concurrency", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3, help="rounds of the c=32 single-sample cell (medians reported)")
    ap.add_argument("--servers", nargs="+", default=["ours-1w", "ours-Nw", "triton", "mlflow"],
                    help="which servers, in order: ours-1w, ours-Nw, triton, mlflow")
    ap.add_argument("--workers", type=int, default=0, help="workers of ours-Nw [default: one per core]")
    ap.add_argument("--triton-venv", type=Path, default=os.environ.get("TRITON_SERVER_VENV"),
                    help="a venv with nvidia-pytriton and onnxruntime [env TRITON_SERVER_VENV]; none: no Triton rows")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu",
                    help="for our server (cuda adds --require-gpu), Triton's model.py and the in-process reference")
    ap.add_argument("--serve-arg", action="append", default=[],
                    help="extra argument for `pipeline serve` (repeatable; --serve-arg=--set --serve-arg=serve.x=1)")
    ap.add_argument("--gpu-scaling", action="store_true",
                    help="instead: ours on CUDA with workers 1, 2, 4, 8, 16 at c=256 single-sample and c=8 x 32 samples")
    ap.add_argument("--json", type=Path, help="also write the cells as JSON here")
    args = ap.parse_args()

    from stages.serve.config import ServeConfig
    from stages.serve.workers import default_workers, worker_config

    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    try:
        onnx = args.onnx
        if onnx is None:
            onnx = work / "digits-cnn.onnx"
            t = time.perf_counter()
            train_digits_cnn(onnx)
            print(f"trained and exported the digits CNN in {time.perf_counter() - t:.1f} s -> {onnx}", flush=True)
        if args.gpu_scaling:
            return gpu_scaling(onnx, work, args)
        workers = args.workers or default_workers()
        grpc_ours = "--grpc-port" in serve_help()
        have_h2load = shutil.which("h2load") is not None
        if not shutil.which("wrk"):
            print("wrk not found (apt-get install wrk): HTTP load from the Python generator, which takes far more "
                  "of the server's CPU", flush=True)
        if not have_h2load:
            print("h2load not found (apt-get install nghttp2-client): no gRPC rows", flush=True)
        if not grpc_ours:
            print("`pipeline serve` has no --grpc-port here: no gRPC rows for ours", flush=True)
        servers = list(args.servers)
        if "triton" in servers and not (args.triton_venv and (Path(args.triton_venv) / "bin" / "python").exists()):
            print("Triton skipped: pass --triton-venv (or TRITON_SERVER_VENV) with nvidia-pytriton and onnxruntime "
                  "installed (see this script's docstring)", flush=True)
            servers.remove("triton")
        ref1 = in_process_samples_per_s(onnx, 1, args.device)
        refb = in_process_samples_per_s(onnx, args.batch_rows, args.device)
        print(f"in-process ONNX Runtime: {ref1:,.0f} samples/s at batch 1, {refb:,.0f} at batch {args.batch_rows}; "
              f"load average before: {load_average()}", flush=True)
        serve_cfg = ServeConfig()
        one = worker_config(serve_cfg, 1).runtime.session_settings().resolved()  # Triton gets ours at 1 worker
        session = {"intra_op_threads": one.intra_op_threads, "allow_spinning": one.allow_spinning}
        b = serve_cfg.batching
        device_args = ["--device", args.device] + (["--require-gpu"] if args.device == "cuda" else [])

        def start(name: str) -> Server:
            log = work / f"{name}.log"
            if name == "ours-1w":
                return start_ours(name, onnx, 1, log, device_args + args.serve_arg, grpc_ours)
            if name == "ours-Nw":
                return start_ours(f"ours-{workers}w", onnx, workers, log, device_args + args.serve_arg, grpc_ours)
            if name == "triton":
                return start_triton(Path(args.triton_venv), onnx, work, log, session, b.max_batch_size,
                                    b.max_queue_delay_ms, args.device)
            if name == "mlflow":
                (work / "store").mkdir(exist_ok=True)
                return start_mlflow(onnx, work / "store", log)
            raise SystemExit(f"unknown server {name!r}")

        x1 = np.random.default_rng(2).standard_normal((1, 1, 8, 8)).astype(np.float32)
        xb = np.random.default_rng(3).standard_normal((args.batch_rows, 1, 8, 8)).astype(np.float32)
        scenarios = [(c, x1) for c in args.concurrency] + [(args.batch_concurrency, xb)]
        cells: list[Cell] = []
        ready: dict[str, float] = {}
        for round_ in range(max(1, args.repeat)):
            for name in servers:
                server = start(name)
                try:
                    ready.setdefault(server.name, server.ready_s)
                    check_answers(server, onnx, args.device)
                    protocols = ["http"] + (["grpc"] if server.grpc_port and have_h2load and server.name != "mlflow"
                                            else [])
                    todo = scenarios if round_ == 0 else [(32, x1)]
                    for concurrency, x in todo:
                        for protocol in protocols:
                            cell = drive(server, protocol, x, concurrency, args.seconds, work)
                            cells.append(cell)
                            print(f"  round {round_ + 1} {cell.scenario:<26} {server.name:<8} {protocol:<4} "
                                  f"{cell.requests_per_s:>8,.0f} req/s  p50 {cell.p50_ms:6.2f} ms  p99 "
                                  f"{cell.p99_ms:7.2f} ms  errors {cell.errors}  server {cell.server_cores:.2f} cores "
                                  f"({cell.cpu_us_per_request:,.0f} us/req), load {cell.load_cores:.2f} cores",
                                  flush=True)
                finally:
                    stop(server.proc)
        print(f"load average after: {load_average()}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = medians(cells)
    report(table, ref1, refb, ready, args)
    if args.json:
        args.json.write_text(json.dumps({"in_process": {"batch_1": ref1, f"batch_{args.batch_rows}": refb},
                                         "ready_s": ready, "cells": [asdict(c) for c in table],
                                         "raw": [asdict(c) for c in cells]}, indent=2))


def medians(cells: list[Cell]) -> list[Cell]:
    """One row per (scenario, server, protocol): the median of its runs."""
    groups: dict[tuple, list[Cell]] = {}
    for c in cells:
        groups.setdefault((c.concurrency, c.rows, c.server, c.protocol), []).append(c)
    out = []
    for key, group in groups.items():
        med = {f: statistics.median(getattr(c, f) for c in group)
               for f in ("requests_per_s", "samples_per_s", "p50_ms", "p99_ms", "server_cores",
                         "cpu_us_per_request", "load_cores")}
        out.append(Cell(group[0].server, group[0].protocol, group[0].scenario, group[0].concurrency, group[0].rows,
                        errors=sum(c.errors for c in group), runs=len(group), **med))
    return out


def report(cells: list[Cell], ref1: float, refb: float, ready: dict, args) -> None:
    import platform

    import onnxruntime

    print(f"\nmachine: {os.cpu_count()} cores, Python {platform.python_version()}, onnxruntime {onnxruntime.__version__}; "
          f"in-process ONNX Runtime {ref1:,.0f} samples/s at batch 1, {refb:,.0f} at batch {args.batch_rows}")
    print("cold start to ready (s): " + ", ".join(f"{k} {v:.1f}" for k, v in ready.items()) + "\n")
    head = ("| scenario | server | protocol | req/s | p50 ms | p99 ms | errors | req/s vs triton | p99 vs triton "
            "| server cores | load cores | runs |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    triton = {(c.concurrency, c.rows, c.protocol): c for c in cells if c.server == "triton"}
    order = sorted(cells, key=lambda c: (c.rows, c.concurrency, c.protocol != "http", c.protocol,
                                         ["ours-1w", "triton", "mlflow"].index(c.server) if c.server in
                                         ("ours-1w", "triton", "mlflow") else 1))
    for c in order:
        t = triton.get((c.concurrency, c.rows, c.protocol))
        ratio = f"{c.requests_per_s / t.requests_per_s:.2f}x" if t and c is not t and t.requests_per_s else ""
        p99r = f"{c.p99_ms / t.p99_ms:.2f}" if t and c is not t and t.p99_ms else ""
        print(f"| {c.scenario} | {c.server} | {c.protocol} | {c.requests_per_s:,.0f} | {c.p50_ms:.2f} | {c.p99_ms:.2f} "
              f"| {c.errors} | {ratio} | {p99r} | {c.server_cores:.2f} | {c.load_cores:.2f} | {c.runs} |")
    print()
    ours = [c for c in cells if c.server.startswith("ours-") and c.server != "ours-1w"] or \
        [c for c in cells if c.server == "ours-1w"]
    for c in ours:
        t = triton.get((c.concurrency, c.rows, c.protocol))
        if t:
            r = c.requests_per_s / t.requests_per_s
            print(f"goal {c.server} {c.protocol} {c.scenario}: {r:.2f}x Triton's req/s (>= 1.5) "
                  f"{'PASS' if r >= 1.5 else 'MISS'}; p99 {c.p99_ms:.2f} vs {t.p99_ms:.2f} ms "
                  f"{'PASS' if c.p99_ms <= t.p99_ms else 'MISS'}")
    for c in ours:
        if c.concurrency == 32 and c.rows == 1 and c.protocol == "http":
            ok = c.requests_per_s >= 10_000 and c.p99_ms <= 10
            print(f"goal {c.server} c=32 HTTP: {c.requests_per_s:,.0f} req/s (>= 10,000), p99 {c.p99_ms:.2f} ms (<= 10) "
                  f"{'PASS' if ok else 'MISS'}")
        if c.concurrency == 128 and c.rows == 1:
            r = c.p99_ms / c.p50_ms
            print(f"goal {c.server} c=128 {c.protocol}: p99 {r:.1f}x p50 (<= 3) {'PASS' if r <= 3 else 'MISS'}")
    http = {(c.server, c.concurrency, c.rows): c for c in ours if c.protocol == "http"}
    for c in ours:
        h = http.get((c.server, c.concurrency, c.rows))
        if c.protocol == "grpc" and h:
            print(f"goal {c.server} gRPC >= HTTP {c.scenario}: {c.requests_per_s:,.0f} vs {h.requests_per_s:,.0f} req/s "
                  f"{'PASS' if c.requests_per_s >= h.requests_per_s else 'MISS'}")


def gpu_scaling(onnx: Path, work: Path, args) -> None:
    """Ours on CUDA with 1, 2, 4, 8, 16 workers: c=256 single-sample and c=8 x 32 samples (HTTP, and gRPC
    where there is one), against in-process ONNX Runtime CUDA at batch 32. Written for the GPU machine
    (16 cores, one GPU); not run on the development machine."""
    ref = in_process_samples_per_s(onnx, args.batch_rows, "cuda")
    print(f"in-process ONNX Runtime CUDA: {ref:,.0f} samples/s at batch {args.batch_rows}", flush=True)
    grpc = "--grpc-port" in serve_help() and shutil.which("h2load") is not None
    x1 = np.random.default_rng(2).standard_normal((1, 1, 8, 8)).astype(np.float32)
    xb = np.random.default_rng(3).standard_normal((args.batch_rows, 1, 8, 8)).astype(np.float32)
    cells = []
    for n in (1, 2, 4, 8, 16):
        server = start_ours(f"ours-{n}w", onnx, n, work / f"ours-{n}.log",
                            ["--device", "cuda", "--require-gpu", *args.serve_arg], grpc)
        try:
            check_answers(server, onnx, "cuda")
            for protocol in ["http"] + (["grpc"] if grpc else []):
                for c, x in ((256, x1), (args.batch_concurrency, xb)):
                    cell = drive(server, protocol, x, c, args.seconds, work)
                    cells.append(cell)
                    print(f"  workers {n:>2} {protocol:<4} {cell.scenario:<26} {cell.requests_per_s:>9,.0f} req/s "
                          f"{cell.samples_per_s:>10,.0f} samples/s  p50 {cell.p50_ms:.2f}  p99 {cell.p99_ms:.2f} ms  "
                          f"errors {cell.errors}  ({cell.samples_per_s / ref:.2f} of in-process)", flush=True)
        finally:
            stop(server.proc)
    best = max((c for c in cells if c.concurrency == 256), key=lambda c: c.requests_per_s, default=None)
    if best:
        print(f"goal c=256: {best.requests_per_s:,.0f} req/s with {best.server} (>= 30,000) "
              f"{'PASS' if best.requests_per_s >= 30_000 else 'MISS'}")
    if args.json:
        args.json.write_text(json.dumps({"in_process_cuda": ref, "cells": [asdict(c) for c in cells]}, indent=2))


if __name__ == "__main__":
    main()
