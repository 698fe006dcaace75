#!/usr/bin/env bash
# Triton's perf_analyzer, unchanged, against `pipeline serve` over HTTP and gRPC.
#
#   benchmarks/perf_analyzer.sh [MODEL] [CONCURRENCY]     # MODEL: a .onnx path or models:/NAME@ALIAS
#   benchmarks/perf_analyzer.sh runs/digits-cnn/model.onnx 1:8:7
#
# MODEL defaults to models:/digits-cnn@champion (what `make` registers); without it, the default recipe's
# digits CNN is trained for 2 epochs first (benchmarks/serve_load.py's, ~10 s). CONCURRENCY is
# perf_analyzer's --concurrency-range (default 1:32:31, i.e. 1 and 32).
#
# Setup, done here when missing: perf_analyzer ships in the tritonclient==2.46.0 wheel's bin/ (.venv-triton,
# `make test` installs it); it needs Debian's libb64-0d (apt-get install -y libb64-0d, as root) and
# libcudart.so.12 even on a CPU-only machine (pip's nvidia-cuda-runtime-cu12, into .venv-triton).
# The server runs on free loopback ports with the recipe's serve settings and stops (SIGTERM) at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${1:-models:/digits-cnn@champion}"
CONCURRENCY="${2:-1:32:31}"
INTERVAL_MS="${PERF_INTERVAL_MS:-2000}"
PA=.venv-triton/bin/perf_analyzer
TPY=.venv-triton/bin/python

[ -x "$PA" ] || make .venv-triton/.installed
if ! ldconfig -p | grep -q libb64.so.0d; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get install -y -qq libb64-0d >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq libb64-0d >/dev/null; }
    else
        echo "perf_analyzer needs libb64: run 'sudo apt-get install -y libb64-0d'" >&2; exit 2
    fi
fi
CUDART=$(ls -d .venv-triton/lib/python3*/site-packages/nvidia/cuda_runtime/lib 2>/dev/null | head -1 || true)
if [ -z "$CUDART" ]; then
    "$TPY" -m pip install -qq -c constraints-triton.txt nvidia-cuda-runtime-cu12
    CUDART=$(ls -d .venv-triton/lib/python3*/site-packages/nvidia/cuda_runtime/lib | head -1)
fi
export LD_LIBRARY_PATH="$PWD/$CUDART${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
if [[ "$MODEL" == models:/* ]] && ! .venv/bin/python -c "
import sys, mlflow; from pipeline.tracking import resolve_model; resolve_model('$MODEL')" >/dev/null 2>&1; then
    echo "($MODEL not found: training the default recipe's digits CNN for 2 epochs instead)"
    .venv/bin/python -c "from pathlib import Path; import benchmarks.serve_load as s; s.train_digits_cnn(Path('$WORK/model.onnx'))"
    MODEL="$WORK/model.onnx"
fi
free_port() { .venv/bin/python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
HTTP_PORT=$(free_port); GRPC_PORT=$(free_port)
.venv/bin/pipeline serve --model "$MODEL" --name digits --port "$HTTP_PORT" --grpc-port "$GRPC_PORT" >"$WORK/server.log" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true; rm -rf "$WORK"' EXIT
for _ in $(seq 1 300); do
    curl -sf "http://127.0.0.1:$HTTP_PORT/v2/health/ready" >/dev/null 2>&1 && break
    kill -0 $SERVER 2>/dev/null || { cat "$WORK/server.log"; exit 1; }
    sleep 0.2
done
echo "# perf_analyzer (tritonclient 2.46.0) against $(.venv/bin/pipeline --version), $(nproc) cores, $(date -u +%FT%TZ)"
for protocol in http grpc; do
    port=$HTTP_PORT; [ $protocol = grpc ] && port=$GRPC_PORT
    echo; echo "\$ perf_analyzer -m digits -u 127.0.0.1:$port -i $protocol --concurrency-range $CONCURRENCY --measurement-interval $INTERVAL_MS"
    # Stable within 100% over 3 windows, at most 10: a shared 2-core machine is noisier than perf_analyzer's 10%.
    "$PA" -m digits -u "127.0.0.1:$port" -i $protocol --concurrency-range "$CONCURRENCY" \
        --measurement-interval "$INTERVAL_MS" --stability-percentage 100 --max-trials 10 \
        || echo "(perf_analyzer exited $?)"
done
