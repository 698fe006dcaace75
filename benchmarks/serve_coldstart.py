"""Cold start to ready of `pipeline serve` (one worker, HTTP only) with a given interpreter: median of 5.

    .venv/bin/python benchmarks/serve_coldstart.py .venv/bin/python runs/digits-cnn/model.onnx
    python3 -m venv /tmp/slim && /tmp/slim/bin/pip install -c constraints.txt '.[serve]'
    .venv/bin/python benchmarks/serve_coldstart.py /tmp/slim/bin/python runs/digits-cnn/model.onnx

Each start is timed from the process's launch until GET /v2/health/ready answers 200; the server runs in
a temporary directory (no recipe there), so only the serving path is measured.
"""
import os
import socket
import tempfile
import statistics
import subprocess
import sys
import time
import urllib.request

py, model = sys.argv[1], os.path.abspath(sys.argv[2])
times = []
for _ in range(5):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    t0 = time.perf_counter()
    p = subprocess.Popen([py, "-m", "pipeline.cli", "serve", "--model", model, "--port", str(port), "--grpc-port", "0",
                          "--workers", "1"], cwd=tempfile.gettempdir(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while True:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status == 200:
                break
        except Exception:
            time.sleep(0.01)
    times.append(time.perf_counter() - t0)
    p.terminate(); p.wait()
print(f"{py}: cold start to ready, median of 5: {statistics.median(times):.2f} s (min {min(times):.2f}, max {max(times):.2f})")
