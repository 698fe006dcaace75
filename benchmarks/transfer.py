"""Transfer learning, measured: a pretrained model fine-tuned on little data against the same model from scratch.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/transfer.py          # 5 seeds, the recipes as committed
    .venv/bin/python benchmarks/transfer.py --seeds 3 --set train.epochs=20

Pretrains configs/mnist1d-pretrain.yaml (the custom residual CNN on MNIST-1D's digits 0-4) once, then,
for each seed, draws a training split of the digits 5-9 with 20 samples per class (``prepare.seed``;
validation and test keep their sizes) and trains configs/mnist1d-finetune.yaml on it four ways, each
with the same budget (epochs and batch size, so the same optimizer steps; the same learning rate and
schedule); only ``train.finetune`` differs:

- scratch:           random initialization
- pretrained:        the digits 0-4 weights (a new head: the label set differs), everything trained from the start
- frozen 3:          the same, the backbone frozen for the first 3 epochs (the head trains alone)
- frozen 3, 0.3 lr:  the same, then the backbone at 0.3 x the head's learning rate

It prints the test accuracy per arm as mean ± std over the seeds (sample standard deviation), the
per-seed values and the mean time per run. Untracked, in a temporary directory (--workdir to keep it).
On a shared machine OMP_NUM_THREADS=1 avoids thread oversubscription (several times faster here).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: the project's packages and examples/

ARMS = {
    "scratch": {"weights": "", "freeze_epochs": 0, "backbone_lr_scale": 1.0},
    "pretrained": {"freeze_epochs": 0, "backbone_lr_scale": 1.0},
    "frozen 3": {"freeze_epochs": 3, "backbone_lr_scale": 1.0},
    "frozen 3, 0.3 lr": {"freeze_epochs": 3, "backbone_lr_scale": 0.3},
}


def _stages(recipe, rundir, stages: tuple[str, ...]) -> dict:
    from pipeline.orchestrate import run_stage

    return {stage: run_stage(stage, recipe, rundir, track=False) for stage in stages}


def _test_accuracy(rundir) -> float:
    return json.loads(rundir.metrics.read_text())["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="override key=value of the fine-tuning recipe (every arm)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the run directories here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.chdir(ROOT)  # the recipes' factory (examples.custom_model.resnet) is imported from here

    from pipeline.config import load_recipe
    from stages.contract import RunDir

    work = args.workdir or Path(tempfile.mkdtemp(prefix="transfer-"))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; commit {commit or '?'}; seeds 0..{args.seeds - 1}; "
          f"overrides: {' '.join(args.overrides) or 'none'}; run directories under {work}", flush=True)

    pretrain = load_recipe(ROOT / "configs" / "mnist1d-pretrain.yaml")
    pre_dir = RunDir(work / "pretrain").ensure()
    started = time.perf_counter()
    _stages(pretrain, pre_dir, ("prepare", "train", "evaluate"))
    print(f"pretrained on MNIST-1D's digits 0-4: test accuracy {_test_accuracy(pre_dir):.4f} "
          f"({time.perf_counter() - started:.0f} s)", flush=True)

    results: dict[str, list[float]] = {arm: [] for arm in ARMS}
    seconds: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for seed in range(args.seeds):
        base = load_recipe(ROOT / "configs" / "mnist1d-finetune.yaml",
                           [*args.overrides, f"prepare.seed={seed}", f"train.seed={seed}",
                            f"train.finetune.weights={pre_dir.checkpoint}"])
        for arm, changes in ARMS.items():
            recipe = dataclasses.replace(base, train=dataclasses.replace(
                base.train, finetune=dataclasses.replace(base.train.finetune, **changes)))
            rundir = RunDir(work / f"seed{seed}-{arm.replace(' ', '').replace(',', '-')}").ensure()
            t0 = time.perf_counter()
            _stages(recipe, rundir, ("prepare", "train", "evaluate"))
            seconds[arm].append(time.perf_counter() - t0)
            results[arm].append(_test_accuracy(rundir))
            print(f"seed {seed} {arm:<17} test accuracy {results[arm][-1]:.4f} ({seconds[arm][-1]:.0f} s)", flush=True)

    train = base.train
    print(f"\n{base.prepare.samples_per_class} training samples per class of MNIST-1D's digits 5-9; {train.epochs} "
          f"epochs, batch {train.batch_size}, lr {train.lr} ({train.schedule}, warm-up {train.warmup_epochs})\n")
    print(f"| start | test accuracy (mean ± std, {args.seeds} seeds) | per seed | seconds per run |")
    print("|---|---|---|---|")
    for arm in ARMS:
        values = results[arm]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"| {arm} | {statistics.mean(values):.4f} ± {std:.4f} | {', '.join(f'{v:.3f}' for v in values)} | "
              f"{statistics.mean(seconds[arm]):.0f} |")


if __name__ == "__main__":
    main()
