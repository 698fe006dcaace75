"""Load benchmark: onnx-pipeline's v2 server against `mlflow models serve`, same model, same load.

    .venv/bin/python benchmarks/serve_load.py                 # trains the digits CNN (~10 s), then ~2 min of load
    .venv/bin/python benchmarks/serve_load.py --onnx runs/digits-cnn/model.onnx --seconds 10 --json out.json

The model: unless ``--onnx`` is given, the default recipe's digits CNN (channels 32-64-64, hidden 128,
8x8x1 input, 10 classes) trained for 2 epochs on scikit-learn's bundled digits and exported with a
dynamic batch dim (the speed of serving does not depend on how well it is trained). It is served two
ways on loopback, each in its own process:

- onnx-pipeline: ``pipeline serve --model model.onnx`` (the recipe's defaults: dynamic batching on),
  v2 JSON requests;
- MLflow: the same file logged with the ONNX flavor into a temporary store, then
  ``mlflow models serve -m runs:/<id>/model --env-manager local`` (the venv's bin/ on PATH), its
  ``/invocations`` JSON (``{"inputs": [...]}``).

Both are driven by the same closed-loop load generator: N connections (HTTP/1.1 keep-alive, raw
asyncio sockets, so the generator costs little of the 2 cores it shares with the server), each sending
the next request as soon as the previous answer arrived, for ``--seconds`` after a one-second warm-up.
Scenarios: one sample per request at concurrency 1, 8 and 32, then 32 samples per request at
concurrency ``--batch-concurrency``. Recorded per cell: requests/s, samples/s, p50 and p99 latency,
errors (non-200 answers or broken connections), and the CPU the server's processes used (cores, and
microseconds per request: on a busy shared machine steadier than requests/s). Every server answer is first checked against
in-process ONNX Runtime. In-process ONNX Runtime samples/s at batch 1 and 32 (its default threads)
is printed for reference; the goals of issue 5 are checked at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
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
    torch.onnx.export(model, (x[:2],), str(path), dynamo=False, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17)


def in_process_samples_per_s(path: Path, batch: int, device: str, seconds: float = 2.0) -> float:
    import onnxruntime as ort

    from stages.predictors import ort_providers

    session = ort.InferenceSession(str(path), providers=ort_providers(device))  # ORT's default threads
    x = np.random.default_rng(0).standard_normal((batch, 1, 8, 8)).astype(np.float32)
    for _ in range(50):
        session.run(None, {"input": x})
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(20):
            session.run(None, {"input": x})
        n += 20
    return n * batch / (time.perf_counter() - start)


# --- the servers --------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(port: int, path: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited ({proc.returncode}); see its log above")
        try:
            if httpx.get(f"http://127.0.0.1:{port}{path}", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"server on port {port} not ready after {timeout:.0f} s")


def start_ours(onnx: Path, port: int, log: Path, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pipeline.cli", "serve", "--model", str(onnx), "--name", MODEL_NAME, "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    wait_http(port, "/v2/health/ready", proc)
    return proc


def start_mlflow(onnx: Path, port: int, store: Path, log: Path) -> subprocess.Popen:
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
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [str(BIN / "mlflow") if (BIN / "mlflow").exists() else (shutil.which("mlflow") or "mlflow"), "models", "serve", "-m", f"runs:/{run.info.run_id}/model", "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(cmd, cwd=store, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own group: mlflow forks a uvicorn child
    wait_http(port, "/ping", proc)
    return proc


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
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


# --- request bodies -----------------------------------------------------------------------------

def v2_body(x: np.ndarray) -> bytes:
    return json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
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


def http_request(path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


# --- the load generator -------------------------------------------------------------------------

async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    i = lower.find(b"content-length:")
    if i >= 0:
        n = int(lower[i + 15:lower.index(b"\r\n", i)])
        return status, await reader.readexactly(n)
    if b"transfer-encoding: chunked" in lower:
        chunks = []
        while True:
            size = int((await reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                return status, b"".join(chunks)
            chunks.append(data[:-2])
    raise RuntimeError("response without Content-Length or chunked encoding")


async def _connection(port: int, request: bytes, warm_until: float, stop_at: float, latencies: list,
                      errors: list) -> None:
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
                if status == 200:
                    latencies.append(t1 - t0)
                else:
                    errors.append(status)
        except (OSError, asyncio.IncompleteReadError, RuntimeError, ValueError) as e:
            if time.perf_counter() >= warm_until:
                errors.append(type(e).__name__)
            if writer is not None:
                writer.close()
            reader = writer = None
            await asyncio.sleep(0.01)
    if writer is not None:
        writer.close()


@dataclass
class Cell:
    server: str
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


async def _drive(port: int, request: bytes, concurrency: int, seconds: float, warmup: float):
    start = time.perf_counter()
    warm_until, stop_at = start + warmup, start + warmup + seconds
    latencies: list[float] = []
    errors: list = []
    await asyncio.gather(*(_connection(port, request, warm_until, stop_at, latencies, errors)
                           for _ in range(concurrency)))
    return latencies, errors


def drive(server: str, port: int, path: str, body: bytes, concurrency: int, rows: int, seconds: float,
          warmup: float = 1.0, pid: int | None = None) -> Cell:
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    cpu0, t0 = (cpu_seconds(pid) if pid else float("nan")), time.perf_counter()
    latencies, errors = runner(_drive(port, http_request(path, body), concurrency, seconds, warmup))
    cpu = (cpu_seconds(pid) if pid else float("nan")) - cpu0  # warm-up included, like the wall time below
    wall = time.perf_counter() - t0
    lat = np.asarray(latencies) * 1000 if latencies else np.asarray([np.nan])
    answered = len(latencies) * (wall / seconds)  # requests answered over the whole wall time, roughly
    return Cell(server, f"c={concurrency}, {rows} sample{'s' if rows > 1 else ''}/request", concurrency, rows,
                len(latencies) / seconds, len(latencies) * rows / seconds, float(np.percentile(lat, 50)),
                float(np.percentile(lat, 99)), len(errors), cpu / wall, cpu / max(answered, 1) * 1e6)


# --- main ---------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--onnx", type=Path, help="an .onnx model with input 'input' (N,1,8,8) [default: train one]")
    ap.add_argument("--seconds", type=float, default=6.0, help="measured seconds per cell (after 1 s warm-up)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--batch-rows", type=int, default=32, help="samples per request in the last scenario")
    ap.add_argument("--batch-concurrency", type=int, default=8)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="for our server (cuda adds --require-gpu) and the in-process reference; mlflow's ONNX "
                         "flavor always asks for CUDA first")
    ap.add_argument("--serve-arg", action="append", default=[],
                    help="extra argument for `pipeline serve` (repeatable; --serve-arg=--set --serve-arg=serve.x=1)")
    ap.add_argument("--json", type=Path, help="also write the cells as JSON here")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    procs: list[subprocess.Popen] = []
    try:
        onnx = args.onnx
        if onnx is None:
            onnx = work / "digits-cnn.onnx"
            t = time.perf_counter()
            train_digits_cnn(onnx)
            print(f"trained and exported the digits CNN in {time.perf_counter() - t:.1f} s -> {onnx}", flush=True)
        ref1 = in_process_samples_per_s(onnx, 1, args.device)
        ref32 = in_process_samples_per_s(onnx, args.batch_rows, args.device)
        print(f"in-process ONNX Runtime: {ref1:,.0f} samples/s at batch 1, {ref32:,.0f} at batch {args.batch_rows}",
              flush=True)

        ours_port, mlflow_port = free_port(), free_port()
        device_args = ["--device", args.device] + (["--require-gpu"] if args.device == "cuda" else [])
        procs.append(start_ours(onnx, ours_port, work / "ours.log", device_args + args.serve_arg))
        (work / "store").mkdir()
        procs.append(start_mlflow(onnx, mlflow_port, work / "store", work / "mlflow.log"))
        servers = {"onnx-pipeline": (ours_port, f"/v2/models/{MODEL_NAME}/infer", v2_body, v2_outputs),
                   "mlflow": (mlflow_port, "/invocations", mlflow_body, mlflow_outputs)}
        pids = {"onnx-pipeline": procs[0].pid, "mlflow": procs[1].pid}

        import httpx
        import onnxruntime as ort

        check = np.random.default_rng(1).standard_normal((3, 1, 8, 8)).astype(np.float32)
        expected = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"]).run(None, {"input": check})[0]
        for name, (port, path, body, read) in servers.items():
            r = httpx.post(f"http://127.0.0.1:{port}{path}", content=body(check),
                           headers={"content-type": "application/json"}, timeout=30)
            assert r.status_code == 200, f"{name}: {r.status_code} {r.text[:300]}"
            # CUDA convolutions run in TF32 by default: ~1e-3 off the CPU's fp32 logits (seen on an H100).
            atol = 5e-3 if args.device == "cuda" else 1e-4
            np.testing.assert_allclose(read(r.content), expected, atol=atol, err_msg=f"{name} answers differently")
        print("both servers answer like in-process ONNX Runtime; driving load "
              f"({args.seconds:g} s per cell after 1 s warm-up)", flush=True)

        x1 = np.random.default_rng(2).standard_normal((1, 1, 8, 8)).astype(np.float32)
        xb = np.random.default_rng(3).standard_normal((args.batch_rows, 1, 8, 8)).astype(np.float32)
        scenarios = [(c, x1) for c in args.concurrency] + [(args.batch_concurrency, xb)]
        cells: list[Cell] = []
        for concurrency, x in scenarios:
            for name, (port, path, body, _) in servers.items():
                cell = drive(name, port, path, body(x), concurrency, len(x), args.seconds, pid=pids[name])
                cells.append(cell)
                print(f"  {cell.scenario:<28} {name:<14} {cell.requests_per_s:>9,.0f} req/s  "
                      f"p50 {cell.p50_ms:7.2f} ms  p99 {cell.p99_ms:7.2f} ms  errors {cell.errors}  "
                      f"server {cell.server_cores:.2f} cores, {cell.cpu_us_per_request:,.0f} us CPU/request", flush=True)
    finally:
        for p in procs:
            stop(p)
    report(cells, ref1, ref32, args)
    if args.json:
        args.json.write_text(json.dumps({"in_process": {"batch_1": ref1, f"batch_{args.batch_rows}": ref32},
                                         "cells": [asdict(c) for c in cells]}, indent=2))
    shutil.rmtree(work, ignore_errors=True)


def report(cells: list[Cell], ref1: float, ref32: float, args) -> None:
    import platform

    import onnxruntime

    by = {(c.scenario, c.server): c for c in cells}
    print(f"\nmachine: {os.cpu_count()} cores, {platform.python_version()}, onnxruntime {onnxruntime.__version__}")
    print(f"in-process ONNX Runtime (default threads): {ref1:,.0f} samples/s at batch 1, "
          f"{ref32:,.0f} samples/s at batch {args.batch_rows}\n")
    head = (f"| {'scenario':<28} | {'server':<13} | {'req/s':>8} | {'samples/s':>9} | {'p50 ms':>7} | {'p99 ms':>7} "
            f"| {'errors':>6} | {'req/s ratio':>11} | {'p99 ratio':>9} | {'server cores':>12} | {'CPU us/req':>10} |")
    print(head)
    print("|" + "|".join("-" * (len(p)) for p in head.split("|")[1:-1]) + "|")
    for scenario in dict.fromkeys(c.scenario for c in cells):
        ours, theirs = by[(scenario, "onnx-pipeline")], by[(scenario, "mlflow")]
        for c in (ours, theirs):
            ratio = (f"{ours.requests_per_s / theirs.requests_per_s:.1f}x" if c is ours and theirs.requests_per_s
                     else "")
            p99r = f"{ours.p99_ms / theirs.p99_ms:.2f}" if c is ours and theirs.p99_ms else ""
            print(f"| {scenario:<28} | {c.server:<13} | {c.requests_per_s:>8,.0f} | {c.samples_per_s:>9,.0f} "
                  f"| {c.p50_ms:>7.2f} | {c.p99_ms:>7.2f} | {c.errors:>6} | {ratio:>11} | {p99r:>9} "
                  f"| {c.server_cores:>12.2f} | {c.cpu_us_per_request:>10,.0f} |")
    c32 = max(args.concurrency)
    single = [c for c in cells if c.concurrency == c32 and c.rows == 1]
    batched = [c for c in cells if c.rows == args.batch_rows and c.server == "onnx-pipeline"]
    print()
    if len(single) == 2:
        ours, theirs = (next(c for c in single if c.server == s) for s in ("onnx-pipeline", "mlflow"))
        r = ours.requests_per_s / max(theirs.requests_per_s, 1e-9)
        p = ours.p99_ms / theirs.p99_ms
        print(f"goal c={c32} single sample: req/s {r:.1f}x mlflow (goal >= 5x) {'PASS' if r >= 5 else 'MISS'}; "
              f"p99 {p:.2f} of mlflow's (goal <= 0.20) {'PASS' if p <= 0.2 else 'MISS'}")
    if batched:
        share = batched[0].samples_per_s / ref32
        print(f"goal {args.batch_rows} samples/request: {batched[0].samples_per_s:,.0f} samples/s = {share:.2f} of "
              f"in-process batch-{args.batch_rows} (goal >= 0.50) {'PASS' if share >= 0.5 else 'MISS'}")


if __name__ == "__main__":
    main()
