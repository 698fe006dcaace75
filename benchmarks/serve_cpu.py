"""Server CPU per request, gRPC against HTTP: what each transport costs the server, on a busy machine too.

    .venv/bin/python benchmarks/serve_cpu.py --onnx model.onnx --name digits
    .venv/bin/python benchmarks/serve_cpu.py --onnx model.onnx --repo ../main    # another checkout's server

Starts ``pipeline serve --workers 1 --grpc-port P`` (the code of ``--repo``, default this checkout) on
the ONNX file, checks one answer per transport, then drives it with ``h2load`` (one thread,
``--concurrency`` connections, one request in flight each, one sample per request): gRPC ModelInfer
(raw contents) and HTTP/1.1 JSON infer (``h2load --h1``), interleaved over ``--rounds`` rounds so
that both see the same background load. Per run: requests/s and the server's CPU microseconds per
request (utime + stime of every process of the server's session, from /proc, over the measured run
only; the warm-up run before it is not counted). Requests/s depends on what else the machine runs;
CPU per request much less so, which is why it is the number to compare. Prints the machine, the load
average before and after, the commit served and the medians.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import (GRPC_INFER, _field, _varint, cpu_seconds, free_port, grpc_outputs, load_average,  # noqa: E402
                        stop, wait_http)

ROOT = Path(__file__).resolve().parents[1]


def model_input(onnx: Path) -> tuple[str, np.ndarray]:
    """The model's first input name and one sample of it (dynamic dims as 1), random float32."""
    import onnxruntime as ort

    spec = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"]).get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in spec.shape]
    return spec.name, np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def grpc_message(model: str, name: str, x: np.ndarray) -> bytes:
    """A framed ``ModelInferRequest`` (5-byte gRPC prefix), the input in ``raw_input_contents``."""
    tensor = _field(1, name.encode()) + _field(2, b"FP32") + _field(3, b"".join(_varint(d) for d in x.shape))
    request = _field(1, model.encode()) + _field(5, tensor) + _field(7, x.tobytes())
    return b"\x00" + len(request).to_bytes(4, "big") + request


def http_body(name: str, x: np.ndarray) -> bytes:
    import json

    return json.dumps({"inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()


def h2load(args: list[str], seconds: float) -> int:
    """Runs h2load; the number of requests that succeeded (every one must: a failure stops the benchmark)."""
    r = subprocess.run(["h2load", "-t1", *args, f"-D{seconds:g}"], capture_output=True, text=True,
                       timeout=seconds + 60)
    counts = {}
    for line in r.stdout.splitlines():
        # "requests: N total, N started, N done, N succeeded, N failed, N errored, N timeout"
        if line.startswith("requests:"):
            words = line.replace(",", "").split()
            counts = {words[i + 1]: int(words[i]) for i in range(1, len(words) - 1, 2)}
    if not counts.get("succeeded") or counts.get("failed") or counts.get("errored"):
        raise SystemExit(f"h2load {' '.join(args)}: {counts or r.stdout[-800:] + r.stderr[-400:]}")
    return counts["succeeded"]


def measure(pid: int, args: list[str], seconds: float, warmup: float) -> tuple[float, float]:
    """(requests/s, server CPU us/request) of one h2load run after an unmeasured warm-up run."""
    h2load(args, warmup)
    cpu0 = cpu_seconds(pid)
    n = h2load(args, seconds)
    return n / seconds, (cpu_seconds(pid) - cpu0) / n * 1e6


def check_answers(grpc_port: int, http_port: int, model: str, grpc_body: bytes, body: bytes) -> None:
    """One answer per transport, before any load: status 200 and grpc-status 0 with outputs."""
    import grpc
    import httpx

    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        answer = channel.unary_unary(GRPC_INFER)(grpc_body[5:], timeout=30)
    assert len(grpc_outputs(b"\0\0\0\0\0" + answer)) > 0, "gRPC answer without raw_output_contents"
    r = httpx.post(f"http://127.0.0.1:{http_port}/v2/models/{model}/infer", content=body, timeout=30)
    assert r.status_code == 200 and r.json()["outputs"], r.text


def commit(repo: Path) -> str:
    def git(*a):
        return subprocess.run(["git", "-C", str(repo), *a], capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--untracked-files=no")
    return f"{git('rev-parse', '--short', 'HEAD')} ({git('rev-parse', '--abbrev-ref', 'HEAD')}){' + changes' if dirty else ''}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--onnx", type=Path, required=True)
    p.add_argument("--name", default="digits", help="the model name to serve it as")
    p.add_argument("--repo", type=Path, default=ROOT, help="the checkout whose `pipeline serve` runs")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=8.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each run")
    p.add_argument("--concurrency", type=int, default=32)
    args = p.parse_args()

    name, x = model_input(args.onnx)
    port, grpc_port = free_port(), free_port()
    work = Path(tempfile.mkdtemp(prefix="serve-cpu-"))
    (work / "grpc.bin").write_bytes(grpc_message(args.name, name, x))
    (work / "http.json").write_bytes(http_body(name, x))
    c = f"-c{args.concurrency}"
    runs = {
        "grpc": [c, "-m1", "-d", str(work / "grpc.bin"), "-H", "content-type: application/grpc", "-H", "te: trailers",
                 f"http://127.0.0.1:{grpc_port}{GRPC_INFER}"],
        "http": ["--h1", c, "-m1", "-d", str(work / "http.json"), "-H", "content-type: application/json",
                 f"http://127.0.0.1:{port}/v2/models/{args.name}/infer"],
    }
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} "
          f"{platform.python_version()}; load average {load_average()}")
    print(f"server: {args.repo.resolve()} at {commit(args.repo)}; model {args.onnx} as {args.name!r}, "
          f"input {name} {list(x.shape)}; h2load c={args.concurrency}, one sample per request")
    log = work / "server.log"
    cmd = [sys.executable, "-m", "pipeline.cli", "serve", "--model", str(args.onnx.resolve()), "--name", args.name,
           "--port", str(port), "--grpc-port", str(grpc_port), "--workers", "1"]
    proc = subprocess.Popen(cmd, cwd=args.repo, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
    try:
        wait_http(port, "/v2/health/ready", proc)
        check_answers(grpc_port, port, args.name, (work / "grpc.bin").read_bytes(), (work / "http.json").read_bytes())
        for r in range(args.rounds):
            for transport, h2args in runs.items():
                rps, us = measure(proc.pid, h2args, args.seconds, args.warmup)
                results[transport].append((rps, us))
                print(f"round {r + 1} {transport}: {rps:8,.0f} req/s  {us:6.0f} us server CPU/request", flush=True)
    finally:
        stop(proc)
    print(f"load average after: {load_average()}")
    for transport, rows in results.items():
        if rows:
            print(f"median {transport}: {statistics.median(r for r, _ in rows):8,.0f} req/s  "
                  f"{statistics.median(u for _, u in rows):6.0f} us server CPU/request  ({len(rows)} rounds)")


if __name__ == "__main__":
    main()
