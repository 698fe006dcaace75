"""How long `pipeline run` takes when everything runs, and again when nothing changed (every stage reused).

    .venv/bin/python benchmarks/reuse.py [--recipe configs/digits-cnn.yaml] [--set train.epochs=5 ...]

Runs the pipeline twice in a temporary run directory against a temporary sqlite store (never mlruns/),
then once more with --explain after changing train.epochs, and prints the wall times and the plan.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=str(ROOT / "configs" / "digits-cnn.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="onnx-pipeline-reuse-") as tmp:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}
        base = [sys.executable, "-m", "pipeline.cli", "run", "--recipe", args.recipe, "--workdir", f"{tmp}/run"]
        base += [x for o in args.overrides for x in ("--set", o)]
        times = {}
        for label in ("first run (every stage runs)", "second run (nothing changed)"):
            t0 = time.perf_counter()
            subprocess.run(base, cwd=ROOT, env=env, check=True, capture_output=True)
            times[label] = time.perf_counter() - t0
        plan = subprocess.run(base + ["--explain", "--set", "train.epochs=3"], cwd=ROOT, env=env, check=True,
                              capture_output=True, text=True).stdout
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; recipe {args.recipe}")
    for label, seconds in times.items():
        print(f"{label:<32} {seconds:7.1f} s")
    print("\n--explain after --set train.epochs=3:\n" + plan)


if __name__ == "__main__":
    main()
