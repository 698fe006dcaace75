"""Is the registered choice fast enough? Prints the issue-4 goal check for a recipe's run directory.

Goal (digits-cnn, this CPU): the chosen variant at batch 256 at least 1.2x the samples/s of ONNX
Runtime fp32, and at least 3x PyTorch eager at batch 1, within 0.5 points of fp32 accuracy.

    python benchmarks/register_goal.py                      # run every stage (no MLflow), then check
    python benchmarks/register_goal.py --reuse              # check an existing runs/digits-cnn/
    python benchmarks/register_goal.py --recipe configs/digits-mlp.yaml --set benchmark.min_seconds=2

Timings on a shared machine are noisy; run it on a quiet one for numbers you report.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="configs/digits-cnn.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override key=value")
    ap.add_argument("--workdir", default=None, help="run directory [default: runs/<recipe name>]")
    ap.add_argument("--reuse", action="store_true", help="check the existing run directory instead of running")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from pipeline.config import load_recipe
    from pipeline.orchestrate import default_rundir, run_pipeline
    from stages.contract import RunDir

    recipe = load_recipe(args.recipe, args.overrides)
    rundir = RunDir(Path(args.workdir)) if args.workdir else default_rundir(recipe)
    if not args.reuse:
        run_pipeline(recipe, rundir, track=False)

    rows = json.loads(rundir.benchmark_json.read_text())["rows"]
    env = json.loads(rundir.benchmark_json.read_text())["environment"]
    reg = json.loads(rundir.registration.read_text())
    variants = json.loads(rundir.variants.read_text())
    chosen, target, provider = reg["variant"], reg["target_batch_size"], reg["provider"]
    torch_label = "torch-cuda" if provider.startswith("CUDA") else "torch-cpu"

    def row(variant, engine, bs, prov):
        return next((r for r in rows if r["variant"] == variant and r["engine"] == engine and r["batch_size"] == bs
                     and r["provider"] == prov), None)

    print(f"{env['cpu']} ({env['cpu_count']} cores, {env['threads']} threads), commit {env['git.commit'][:12]}")
    print(f"{'variant':14} {'accuracy':>8} {'delta pts':>9} {'KiB':>7} {'ms @1':>8} {'ms @64':>8} "
          f"{'ms @' + str(target):>9} {'samples/s @' + str(target):>16}  eligible")
    for name, v in variants["variants"].items():
        if not v.get("ok"):
            print(f"{name:14} failed: {v.get('error', '')[:60]}")
            continue
        r1, r64, rt = (row(name, "onnxruntime", bs, provider) for bs in (1, 64, target))
        ms = lambda r: f"{r['median_ms']:.3f}" if r else "-"
        print(f"{name:14} {v['accuracy']:8.4f} {v.get('delta_points', 0):+9.2f} {v['size_bytes'] / 1024:7.0f} {ms(r1):>8} "
              f"{ms(r64):>8} {ms(rt):>9} {rt['samples_per_s'] if rt else 0:16,.0f}  "
              f"{'yes' if v.get('within_budget') else 'no'}{'  <- chosen' if name == chosen else ''}")
    t1 = row("torch", "torch-eager", 1, torch_label)
    if t1:
        print(f"{'torch eager':14} {'':8} {'':9} {'':7} {t1['median_ms']:8.3f}")
    c_t, f_t, c_1 = row(chosen, "onnxruntime", target, provider), row("fp32", "onnxruntime", target, provider), \
        row(chosen, "onnxruntime", 1, provider)
    print()
    if c_t and f_t:
        ratio = c_t["samples_per_s"] / f_t["samples_per_s"]
        print(f"{chosen} vs ONNX Runtime fp32 at batch {target}: {ratio:.2f}x samples/s (goal >= 1.2x: "
              f"{'met' if ratio >= 1.2 else 'NOT met'})")
    if c_1 and t1:
        ratio = c_1["samples_per_s"] / t1["samples_per_s"]
        print(f"{chosen} vs PyTorch eager at batch 1: {ratio:.2f}x samples/s (goal >= 3x: {'met' if ratio >= 3 else 'NOT met'})")
    delta = variants["variants"][chosen].get("delta_points")
    if delta is not None:
        print(f"{chosen} accuracy vs fp32: {delta:+.2f} points (goal >= -0.5: {'met' if delta >= -0.5 else 'NOT met'})")
    print(f"\nwhy: {reg['reason']}")


if __name__ == "__main__":
    main()
