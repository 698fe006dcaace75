"""Test metric, parameter count and training wall time of recipes: the tables in docs/benchmarks.md.

    .venv/bin/python benchmarks/recipe_accuracy.py configs/mnist1d-*.yaml
    .venv/bin/python benchmarks/recipe_accuracy.py configs/digits-cnn.yaml configs/digits-distill.yaml
    .venv/bin/python benchmarks/recipe_accuracy.py configs/digits-distill.yaml --set train.distill.teacher=
    .venv/bin/python benchmarks/recipe_accuracy.py configs/mnist1d-cnn.yaml --seeds 3

Runs `pipeline prepare`, `train` and `evaluate` per recipe, untracked (--no-track), in each recipe's own
run directory (runs/<name>/, so a distillation recipe finds its teacher there), and prints one markdown
row per recipe. --set applies to every recipe. --seeds N trains each recipe N times (train.seed 0 to N-1;
seed 0 is what `pipeline run` trains) and adds the mean and standard deviation of the test metric: on a
1,000-sample test split, one seed's figure moves by a few tenths of a point from seed to seed. Training time is wall time on this machine: on a shared
one it says more about the neighbours than about the recipe.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pipeline(*args: str) -> dict:
    """One `pipeline` command with --json; its JSON report."""
    p = subprocess.run([sys.executable, "-m", "pipeline.cli", "-q", *args, "--no-track", "--json"], cwd=ROOT,
                       capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"pipeline {' '.join(args)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout)


def parameters(checkpoint: Path) -> int:
    import torch

    import models

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    return sum(p.numel() for p in models.rebuild(ckpt["model"]).parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipes", nargs="+", type=Path)
    parser.add_argument("--seeds", type=int, default=1, help="train each recipe with seeds 0..N-1 (default 1: the "
                        "recipe's own seed)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override key=value")
    args = parser.parse_args()
    overrides = [x for o in args.overrides for x in ("--set", o)]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; commit {commit or '?'}; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; overrides: {' '.join(args.overrides) or 'none'}")
    print("| recipe | model | parameters | test metric | training wall time |")
    print("|---|---|---|---|---|")
    for recipe in args.recipes:
        recipe = recipe.resolve()
        values, seconds = [], []
        for seed in range(args.seeds):
            seeded = [*overrides, "--set", f"train.seed={seed}"] if args.seeds > 1 else overrides
            pipeline("prepare", "-r", str(recipe), *seeded)
            started = time.perf_counter()
            trained = pipeline("train", "-r", str(recipe), *seeded)
            seconds.append(time.perf_counter() - started)
            rundir = Path(trained["run_dir"])
            pipeline("evaluate", "-r", str(recipe), *seeded)
            primary = json.loads((ROOT / rundir / "metrics.json").read_text())["primary"]
            values.append(primary["value"])
        family = json.loads((ROOT / rundir / "checkpoint.json").read_text())["model"].get("family", "?")
        metric = f"{primary['name']} {values[0]:.4f}"
        if args.seeds > 1:
            metric += (f" (seeds 0-{args.seeds - 1}: {statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}; "
                       f"{', '.join(f'{v:.4f}' for v in values)})")
        print(f"| `{recipe.name}` | `{family}` | {parameters(ROOT / rundir / 'checkpoint.pt'):,} | {metric} | "
              f"{statistics.mean(seconds):.0f} s |", flush=True)


if __name__ == "__main__":
    main()
