#!/usr/bin/env bash
# The GPU checks, in one go on a machine with an NVIDIA GPU: the CUDA tests, the training data-path
# benchmark, one whole `pipeline run` on CUDA (training on cuda, benchmark and register on the CUDA
# execution provider), and the serving load benchmark with --device cuda. Every output lands in $OUT
# (or ./gpu-out). Run it from the repository root, with the project's dependencies on the python3 in
# PATH (after `make install`: `source .venv/bin/activate`):
#
#   bash benchmarks/gpu_check.sh
#
# PYTHONPATH points at the checkout (so an environment without the project pip-installed works too),
# MLflow records into a store under /tmp, and each step's exit code is recorded instead of stopping.
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MLFLOW_TRACKING_URI="sqlite:////tmp/gpu-check-mlruns/mlflow.db"
mkdir -p /tmp/gpu-check-mlruns
step() {  # step NAME CMD...: run, keep the output, note the exit code and the wall time
  local name=$1; shift
  local t0=$SECONDS
  "$@" >"$OUT/$name.txt" 2>&1
  echo "$name: exit $? in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
}
{ nvidia-smi -L; python3 -c 'import torch, onnxruntime as o; print("torch", torch.__version__, torch.cuda.get_device_name(0)); print("onnxruntime", o.__version__, o.get_available_providers())'; } >"$OUT/summary.txt" 2>&1
step pytest_cuda python3 -m pytest -q -p no:cacheprovider -k "cuda or gpu" tests/test_stages.py tests/test_train.py tests/test_serve_cli.py
step train_throughput python3 benchmarks/train_throughput.py --device cuda --epochs 3 --seconds 30
step train_throughput_compile python3 benchmarks/train_throughput.py --device cuda --epochs 3 --seconds 30 --compile
step pipeline_run python3 -m pipeline.cli run --recipe configs/digits-cnn.yaml --workdir /tmp/gpu-check-run
cp /tmp/gpu-check-run/benchmark.md "$OUT/benchmark.md" 2>/dev/null
python3 - >"$OUT/mlflow_record.txt" 2>&1 <<'EOF'
from mlflow.tracking import MlflowClient
c = MlflowClient()
exp = c.get_experiment_by_name("digits-cnn")
for r in c.search_runs([exp.experiment_id]):
    t = r.data.tags
    print(r.info.run_name, r.info.status, {k: t[k] for k in t if k.startswith(("device", "providers", "train.", "benchmark."))})
EOF
step serve_load python3 benchmarks/serve_load.py --device cuda --seconds 4
