"""Per-variant accuracy, size and ONNX Runtime latency of a quantized run directory, plus int8-static options.

    .venv/bin/python benchmarks/quantize_variants.py --workdir runs/digits-cnn [--batch-sizes 1 64 256]
        [--threads 1] [--min-seconds 1.0] [--options]

Reads variants.json (run `pipeline quantize` first) and times every variant that built, plus PyTorch
eager on the checkpoint, with the benchmark stage's harness (warm-up, minimum runs and time, median).
``--options`` also builds int8-static with each knob flipped (per-tensor weights, QInt8 activations,
reduce_range, QOperator format, ONNX Runtime's offline optimizations saved on top) and times those, to
keep what measures faster on this CPU. Prints markdown tables; numbers are as noisy as the machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("runs/digits-cnn"))
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads for both engines (0: torch's default)")
    ap.add_argument("--min-seconds", type=float, default=1.0)
    ap.add_argument("--options", action="store_true", help="also time int8-static built with other options")
    args = ap.parse_args()

    import onnx
    import torch

    from stages.contract import RunDir
    from stages import benchmark, checkpoint, dataset
    from stages.onnx_model import OnnxModel
    from stages.predictors import OrtPredictor, TorchPredictor
    from stages.quantize import Config, variants

    rd = RunDir(args.workdir)
    report = json.loads(rd.variants.read_text())
    data = dataset.load(rd.data, rd.dataset)
    fp32 = OnnxModel.open(rd.onnx)
    raw_test, y_test = data.split("test", normalized=False)
    x_test = fp32.feed(raw_test)[fp32.meta.input.name]
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    timing = benchmark.Config(batch_sizes=tuple(args.batch_sizes), warmup_runs=20, min_runs=30,
                              min_seconds=args.min_seconds, max_seconds=max(5.0, args.min_seconds * 3))

    def times(predict) -> dict[int, float]:
        return {bs: benchmark.time_calls(predict, np.resize(x_test, (bs, *x_test.shape[1:])), timing)["median_ms"]
                for bs in args.batch_sizes}

    head = "| variant | status | " + report["metric"] + " | delta | KiB | " + " | ".join(
        f"b{bs} ms" for bs in args.batch_sizes) + " | note |"
    print(f"{rd.root}: {threads} threads per engine\n\n{head}\n|" + "---|" * (head.count("|") - 1))
    torch_ms = times(TorchPredictor(checkpoint.load(rd.checkpoint)[0]).predict) if rd.checkpoint.is_file() else {}
    if torch_ms:
        print(f"| torch eager | | | | | " + " | ".join(f"{torch_ms[bs]:.3f}" for bs in args.batch_sizes) + " | |")
    for name, v in report["variants"].items():
        if not v["ok"]:
            print(f"| {name} | {v['status']} | | | | " + " | ".join("" for _ in args.batch_sizes) + f" | {v['reason'][:90]} |")
            continue
        ms = times(OrtPredictor(rd.variant(name), device="cpu", intra_op_threads=threads).predict)
        note = f"excluded {len(v['excluded_nodes'])} nodes" if v.get("excluded_nodes") else v.get("reason", "")
        print(f"| {name} | {v['status']} | {v['metric']['value']:.4f} | {v['delta']:+.3f} | {v['size_bytes'] / 1024:.0f} | "
              + " | ".join(f"{ms[bs]:.3f}" for bs in args.batch_sizes) + f" | {note} |")
    if not args.options:
        return

    # int8-static with one knob flipped at a time, all else as the recipe had it
    base = Config(calibration_samples=512)
    options = {
        "qdq per-channel quint8 (default)": {},
        "per-tensor weights": {"per_channel": False},
        "qint8 activations": {"activation_type": "qint8"},
        "reduce_range": {"reduce_range": True},
        "qoperator format": {"static_format": "qoperator"},
    }
    x_cal = fp32.feed(data.split("train", normalized=False)[0][:512])
    print(f"\n| int8-static option | {report['metric']} | " + " | ".join(f"b{bs} ms" for bs in args.batch_sizes) + " |\n|"
          + "---|" * (len(args.batch_sizes) + 2))
    with tempfile.TemporaryDirectory() as tmp, variants.preprocessed(rd.onnx) as pre:
        for label, change in options.items():
            cfg = dataclasses.replace(base, **change)
            ctx = variants.Context(config=cfg, task=report["task"], family="", fp32=onnx.load(str(rd.onnx)),
                                   calibration=x_cal, judge_val=None)
            path = Path(tmp) / f"{len(label)}.onnx"
            variants.static_quantize(pre, path, ctx, [])
            paths = {label: path}
            if not change:  # the saved offline optimization of the default, on top
                opt = Path(tmp) / "opt.onnx"
                variants.make_optimized(path, opt, dataclasses.replace(ctx, config=dataclasses.replace(cfg, optimization_level="extended")))
                paths["default + optimized (extended) saved"] = opt
            for lab, p in paths.items():
                acc = OnnxModel.open(p, props=fp32.meta.props).score(raw_test, y_test)["value"]
                ms = times(OrtPredictor(p, device="cpu", intra_op_threads=threads).predict)
                print(f"| {lab} | {acc:.4f} | " + " | ".join(f"{ms[bs]:.3f}" for bs in args.batch_sizes) + " |")


if __name__ == "__main__":
    main()
