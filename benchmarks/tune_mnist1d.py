"""`pipeline tune` on the MNIST-1D recipes: the numbers in docs/benchmarks.md ("Tuning").

    .venv/bin/python benchmarks/tune_mnist1d.py tune configs/mnist1d-cnn.yaml --trials 30
    .venv/bin/python benchmarks/tune_mnist1d.py front configs/mnist1d-cnn.yaml --trials 30 --objective latency_ms
    .venv/bin/python benchmarks/tune_mnist1d.py front configs/mnist1d-cnn.yaml --distill --within 0.002 \
        --space-from configs/mnist1d-cnn-fast.yaml --study-set prepare.val_fraction=0.25
    .venv/bin/python benchmarks/tune_mnist1d.py pruning configs/mnist1d-cnn.yaml --trials 12
    .venv/bin/python benchmarks/tune_mnist1d.py workers configs/mnist1d-cnn.yaml --trials 6 --set train.epochs=6

tune     a single-objective study on the recipe's tune section (validation accuracy); then the best trial's
         overlay (with the --set values) and the recipe as committed (without them) each through `pipeline
         run --no-track` (test accuracy, the only look at the test split); prints wall time, trials
         complete/pruned/failed, validation and test.
front    the same with a second objective (latency_ms, samples_per_s or size_kb): the Pareto front. The
         committed recipe is first trained on the study's split (its validation score there is the
         reference); the chosen point is the front's fastest within --within (0.005) of that reference.
         It and the committed recipe go through `pipeline run --no-track`, then both exported files are
         timed at batch 1 in interleaved rounds (stages/timing.py, the server's session settings) and
         weighed: the speed-up and size ratio beside the test accuracies. --distill: every trial
         distills from that reference run, the chosen point's final run from the committed run.
pruning  two studies with the same seed and budget, median pruner against none: epochs trained, wall
         time and the best validation accuracy of each (what pruning saved at what cost).
workers  the same budget with --workers 1 and --workers 2: the wall-time ratio.

Everything goes to a store of its own (--store, default runs/tune-bench: MLflow's mlflow.db and Optuna's
optuna.db), never mlruns/. Single-worker studies run with one torch thread (OMP_NUM_THREADS=1): on a
2-core machine shared with other jobs, two spin-waiting threads were several times slower per step.
`pipeline run` here keeps quantize to int8-dynamic and benchmark to batch 1: the model and its test
accuracy are the same as with every variant, in minutes less.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHEAP = ["--set", "quantize.variants=[int8-dynamic]", "--set", "benchmark.batch_sizes=[1]",
         "--set", "benchmark.include_torch=false"]


def env(store: Path, threads: int | None = 1) -> dict:
    out = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{store.resolve()}/mlflow.db"}
    if threads:
        out["OMP_NUM_THREADS"] = str(threads)
    return out


def pipeline(args: list[str], store: Path, threads: int | None = 1, log: Path | None = None) -> dict:
    """One `pipeline` command with --json; its JSON report (stderr to ``log``)."""
    with open(log or os.devnull, "a") as err:
        p = subprocess.run([sys.executable, "-m", "pipeline.cli", *args, "--json"], cwd=ROOT, env=env(store, threads),
                           stdout=subprocess.PIPE, stderr=err, text=True)
    if p.returncode != 0:
        sys.exit(f"pipeline {' '.join(args)} failed ({p.returncode}); see {log}")
    return json.loads(p.stdout)


def run_test(recipe: Path, store: Path, workdir: Path, overlay: str | None, sets: list[str]) -> dict:
    """`pipeline run --no-track` (test split); -> test and validation accuracy, parameters, file size."""
    args = ["run", "-r", str(recipe), "-w", str(workdir), "--no-track", *CHEAP, *sets]
    if overlay:
        args += ["--recipe-overlay", overlay]
    started = time.perf_counter()
    pipeline(args, store, log=workdir.with_suffix(".log"))
    metrics = json.loads((workdir / "metrics.json").read_text())
    train = json.loads((workdir / "results" / "train.json").read_text())["result"]
    return {"test_accuracy": metrics["primary"]["value"], "val_accuracy": train["value"],
            "best_epoch": train["best_epoch"], "onnx_kb": (workdir / "model.onnx").stat().st_size / 1024,
            "seconds": time.perf_counter() - started, "workdir": str(workdir)}


def tune(recipe: Path, store: Path, study: str, trials: int, sets: list[str], workers: int = 1) -> tuple[dict, float]:
    workdir = store / study
    started = time.perf_counter()
    summary = pipeline(["tune", "-r", str(recipe), "--study", study, "--trials", str(trials), "--workers", str(workers),
                        "-w", str(workdir), *sets], store, threads=1 if workers == 1 else None,
                       log=store / f"{study}.log")
    return summary, time.perf_counter() - started


def header(args) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; commit "
          f"{commit.strip() or '?'}; {args.command} {args.recipe} trials {args.trials}; sets: {' '.join(args.set) or 'none'}; "
          f"study sets: {' '.join(args.study_set) or 'none'}; space from: {args.space_from or 'the recipe'}; "
          f"distill: {args.distill}; within: {args.within}",
          flush=True)


def counts(summary: dict) -> str:
    c = summary["counts"]
    return f"{c['complete']} complete, {c['pruned']} pruned, {c['failed']} failed"


def cmd_tune(args, store: Path, sets: list[str]) -> dict:
    summary, wall = tune(args.recipe, store, args.study, args.trials, [*sets, *args.study_sets])
    best = next(r for r in summary["trials"] if r["number"] == summary["chosen"])
    tuned = run_test(args.recipe, store, store / args.study / "final", summary["overlay"], sets)
    base = run_test(args.recipe, store, store / f"{args.recipe.stem}-committed", None, [])  # as committed
    out = {"study": args.study, "wall_s": wall, "counts": summary["counts"], "epochs": summary["epochs"],
           "chosen": summary["chosen"], "params": best["params"], "trial_val": best["values"][0], "tuned": tuned,
           "committed": base}
    print(f"| `{args.recipe.name}` | {args.trials} | {wall / 60:.0f} min | {counts(summary)} | "
          f"{summary['epochs']['saved_by_pruning']} of {summary['epochs']['trained'] + summary['epochs']['saved_by_pruning']} "
          f"| {best['values'][0]:.4f} (trial {summary['chosen']}) | {tuned['val_accuracy']:.4f} | "
          f"{tuned['test_accuracy']:.2%} | {base['test_accuracy']:.2%} |")
    print("  --set " + " --set ".join(f"{k}={json.dumps(v)}" for k, v in best["params"].items()), flush=True)
    return out


def time_pair(a: Path, b: Path, recipe: Path, batch: int = 1, rounds: int = 10, seconds: float = 4.0) -> dict:
    """Both files timed at ``batch`` in interleaved rounds with the recipe's serve.runtime sessions."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from pipeline.config import load_recipe
    from stages import dataset, timing
    from stages.onnx_model import OnnxModel
    from stages.predictors import OrtPredictor

    settings = load_recipe(recipe).serve.runtime.session_settings()
    data = dataset.load(a.parent / "data.npz", a.parent / "dataset.json")
    x, _ = data.split("val", normalized=False)
    calls = {}
    for name, path in (("committed", a), ("tuned", b)):
        predictor = OrtPredictor(path, settings=settings)
        feeds = OnnxModel(predictor).meta.feed(np.resize(x, (batch, *x.shape[1:])))
        timing.measure(lambda p=predictor, f=feeds: p.run(f), warmup=50, min_runs=0, max_seconds=0)
        calls[name] = lambda p=predictor, f=feeds: p.run(f)
    times = timing.interleaved(calls, rounds=rounds, min_runs=200 * rounds, min_seconds=seconds, max_seconds=4 * seconds)
    return {n: timing.summarize(t, batch) for n, t in times.items()} | {"session": settings.describe()}


def reference(recipe: Path, store: Path, study_sets: list[str]) -> dict:
    """The recipe as committed, trained on the study's split (--study-set): its validation score there (what
    "within 0.5 points of the committed recipe" means on the split the study chooses by) and its checkpoint
    (--distill: the trials' teacher, which never saw that split's validation samples)."""
    workdir = store / f"{recipe.stem}-reference"
    for stage in ("prepare", "train"):
        pipeline([stage, "-r", str(recipe), "-w", str(workdir), "--no-track", *study_sets], store,
                 log=workdir.with_suffix(".log"))
    result = json.loads((workdir / "results" / "train.json").read_text())["result"]
    return {"val": result["value"], "checkpoint": str(workdir / "checkpoint.pt"), "workdir": str(workdir)}


def cmd_front(args, store: Path, sets: list[str]) -> dict:
    ref = reference(args.recipe, store, args.study_sets)
    study_sets, final_sets = list(args.study_sets), list(sets)
    if args.distill:  # trials: the reference as teacher; the final run: the committed run
        study_sets += ["--set", f"train.distill.teacher={ref['checkpoint']}"]
        final_sets += ["--set", f"train.distill.teacher={store / f'{args.recipe.stem}-committed' / 'checkpoint.pt'}"]
    study_args = ["--set", f"tune.objectives=[auto, {args.objective}]", *sets, *study_sets]
    summary, wall = tune(args.recipe, store, args.study, args.trials, study_args)
    rows = {r["number"]: r for r in summary["trials"]}
    # The goal's rule: the best front point on the speed objective among those within --within validation
    # points of the committed recipe on the same split (pipeline tune's own rule measures from the front's best).
    near = [n for n in summary["best"] if rows[n]["values"][0] >= ref["val"] - args.within]
    sign = 1 if summary["directions"][1] == "minimize" else -1  # latency_ms, size_kb; samples_per_s is maximized
    chosen = min(near, key=lambda n: sign * rows[n]["values"][1]) if near else summary["chosen"]
    if not near:
        print(f"no front point within {args.within:g} of the committed recipe's validation {ref['val']:.4f}: "
              f"measuring pipeline tune's own choice, trial {chosen}", flush=True)
    overlay = summary["overlay"]
    if chosen != summary["chosen"]:
        overlay = pipeline(["tune", "-r", str(args.recipe), "--study", args.study, "-w", str(store / args.study),
                            "--best", "--pick", str(chosen), *study_args], store,
                           log=store / f"{args.study}.log")["overlay"]
    base = run_test(args.recipe, store, store / f"{args.recipe.stem}-committed", None, [])
    tuned = run_test(args.recipe, store, store / args.study / "final", overlay, final_sets)
    timed = time_pair(Path(base["workdir"]) / "model.onnx", Path(tuned["workdir"]) / "model.onnx", args.recipe)
    print(f"Pareto front ({' vs '.join(summary['objectives'])}), wall {wall / 60:.0f} min, {counts(summary)}; the "
          f"committed recipe on the study's split: validation {ref['val']:.4f}; * chosen (within {args.within:g} "
          f"of it), "
          f"+ pipeline tune's own choice (within tune.pick_within of the front's best):")
    for n in sorted(summary["best"], key=lambda n: rows[n]["values"][1]):
        r = rows[n]
        mark = ("*" if n == chosen else " ") + ("+" if n == summary["chosen"] else " ")
        print(f" {mark} trial {n:>3}: val {r['values'][0]:.4f}, {args.objective} {r['values'][1]:.4g}, "
              f"{r['speed']['size_kb']:.0f} KiB  {json.dumps(r['params'])}")
    speedup = timed["committed"]["median_ms"] / timed["tuned"]["median_ms"]
    smaller = base["onnx_kb"] / tuned["onnx_kb"]
    print(f"| committed | {base['test_accuracy']:.2%} | {timed['committed']['median_ms'] * 1e3:.1f} us | "
          f"{base['onnx_kb']:.0f} KiB |")
    print(f"| tuned (trial {chosen}) | {tuned['test_accuracy']:.2%} | {timed['tuned']['median_ms'] * 1e3:.1f} us "
          f"({speedup:.2f}x faster) | {tuned['onnx_kb']:.0f} KiB ({smaller:.2f}x smaller) |", flush=True)
    return {"study": args.study, "wall_s": wall, "counts": summary["counts"], "front": summary["best"],
            "reference_val": ref["val"], "chosen": chosen, "tune_chosen": summary["chosen"],
            "params": rows[chosen]["params"], "tuned": tuned, "committed": base, "timing": timed,
            "speedup_b1": speedup, "size_ratio": smaller}


def cmd_pruning(args, store: Path, sets: list[str]) -> dict:
    out = {}
    for pruner in ("median", "none"):
        summary, wall = tune(args.recipe, store, f"{args.study}-{pruner}", args.trials,
                             [*sets, *args.study_sets, "--set", f"tune.pruner={pruner}"])
        best = next(r for r in summary["trials"] if r["number"] == summary["chosen"])
        out[pruner] = {"wall_s": wall, "counts": summary["counts"], "epochs": summary["epochs"],
                       "best_val": best["values"][0], "chosen": summary["chosen"], "params": best["params"]}
        print(f"| {pruner} | {args.trials} | {counts(summary)} | {summary['epochs']['trained']} | {wall / 60:.1f} min | "
              f"{best['values'][0]:.4f} (trial {summary['chosen']}) |", flush=True)
    return out


def cmd_workers(args, store: Path, sets: list[str]) -> dict:
    out = {}
    for workers in (1, 2):
        summary, wall = tune(args.recipe, store, f"{args.study}-w{workers}", args.trials, [*sets, *args.study_sets],
                             workers=workers)
        out[workers] = {"wall_s": wall, "counts": summary["counts"]}
        print(f"| {workers} | {args.trials} | {counts(summary)} | {wall:.0f} s |", flush=True)
    print(f"wall time, 2 workers / 1 worker: {out[2]['wall_s'] / out[1]['wall_s']:.2f}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("tune", "front", "pruning", "workers"))
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--study", help="study name (default: the recipe's name and the command)")
    parser.add_argument("--objective", default="latency_ms", help="front: the second objective")
    parser.add_argument("--within", type=float, default=0.005, help="front: the chosen point is the best on the "
                        "second objective among the front's points within this (0.005: 0.5 points) of the committed "
                        "recipe's validation score on the study's split")
    parser.add_argument("--distill", action="store_true", help="front: every trial distills from the committed "
                        "recipe (trained on the study's split; the final run's teacher is the committed run)")
    parser.add_argument("--set", action="append", default=[], help="recipe override for the studies and the runs "
                        "that measure their choice, key=value")
    parser.add_argument("--study-set", action="append", default=[], help="recipe override for the studies only, "
                        "key=value: e.g. prepare.val_fraction=0.25, a finer validation signal to choose by, while the "
                        "chosen trial is measured with the recipe's own split")
    parser.add_argument("--space-from", type=Path, help="search this recipe's tune.space instead (e.g. "
                        "configs/mnist1d-cnn-fast.yaml: the architecture and distillation, the rest as committed)")
    parser.add_argument("--store", type=Path, default=ROOT / "runs" / "tune-bench")
    args = parser.parse_args()
    args.recipe = args.recipe.resolve()
    args.study = args.study or f"{args.recipe.stem}-{args.command}"
    args.store.mkdir(parents=True, exist_ok=True)
    sets = [x for s in args.set for x in ("--set", s)]
    args.study_sets = [x for s in args.study_set for x in ("--set", s)]
    if args.space_from:
        import yaml

        space = yaml.safe_load(args.space_from.read_text())["tune"]["space"]
        args.study_sets = ["--set", f"tune.space={json.dumps(space)}", *args.study_sets]
    header(args)
    result = {"tune": cmd_tune, "front": cmd_front, "pruning": cmd_pruning, "workers": cmd_workers}[args.command](
        args, args.store, sets)
    (args.store / f"{args.study}.json").write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
