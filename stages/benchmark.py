"""benchmark: PyTorch eager and every ONNX variant x execution provider x batch size, measured honestly.

Each row is warmed up, then timed call by call (host arrays in, host arrays out, so the GPU is
synchronized by the copy back) until both a minimum number of calls and a minimum time are reached.
Median and p99 latency and samples/s are reported with the execution provider the session actually
used, and the device, library versions and git commit are written next to the numbers.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from stages import checkpoint, dataset
from stages.common import git_state, library_versions, read_json, write_json, write_text
from stages.predictors import CUDA_EP, OrtPredictor, TorchPredictor, cuda_available

if TYPE_CHECKING:
    from pipeline.rundir import RunDir
    from pipeline.tracking import Tracker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Config:
    batch_sizes: tuple[int, ...] = (1, 64)
    warmup_runs: int = 20
    min_runs: int = 50
    min_seconds: float = 1.0  # per row: long enough for a stable median on a noisy 2-core machine
    max_seconds: float = 10.0
    devices: Literal["auto", "cpu"] = "auto"  # auto: CPU, plus CUDA when a GPU is usable
    include_torch: bool = True
    threads: int = 0  # intra-op threads for torch and ONNX Runtime alike; 0: torch's default (one per core)

    def __post_init__(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"`batch_sizes` must be positive ints, got {list(self.batch_sizes)}")
        if self.warmup_runs < 0 or self.min_runs < 1:
            raise ValueError(f"`warmup_runs` must be >= 0 and `min_runs` >= 1, got {self.warmup_runs}, {self.min_runs}")
        if self.threads < 0:
            raise ValueError(f"`threads` must be >= 0 (0: one per core), got {self.threads}")
        if not 0 < self.min_seconds <= self.max_seconds:
            raise ValueError(f"`min_seconds` must be > 0 and <= max_seconds, got {self.min_seconds}")


@dataclass(frozen=True)
class Result:
    rows: list[dict]

    def summary(self) -> str:
        best = min((r for r in self.rows if r["batch_size"] == min(x["batch_size"] for x in self.rows)),
                   key=lambda r: r["median_ms"])
        where = best["provider"].replace("ExecutionProvider", "")
        return f"{len(self.rows)} rows; batch {best['batch_size']}: {best['variant']} {best['median_ms']:.3f} ms ({where})"


def time_calls(fn, x: np.ndarray, config: Config) -> dict:
    for _ in range(config.warmup_runs):
        fn(x)
    times = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - start
        if (len(times) >= config.min_runs and elapsed >= config.min_seconds) or elapsed >= config.max_seconds:
            break
    ms = np.asarray(times) * 1e3
    median = float(np.median(ms))
    return {"runs": len(times), "median_ms": median, "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "min_ms": float(ms.min()),
            "samples_per_s": len(x) / (median / 1e3)}


def environment() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    env = {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
           "python": platform.python_version(), **git_state()}
    env.update(library_versions(("torch", "onnxruntime-gpu", "onnxruntime", "onnx", "numpy")))
    if cuda_available():
        import torch

        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def markdown(rows: list[dict], env: dict) -> str:
    lines = [f"# Benchmark\n\nCPU: {env['cpu']} ({env['cpu_count']} cores, {env['threads']} threads per engine){'; GPU: ' + env['gpu'] if 'gpu' in env else ''}; "
             f"onnxruntime {env.get('onnxruntime-gpu') or env.get('onnxruntime')}, torch {env.get('torch')}, "
             f"commit {env['git.commit'][:12]}\n",
             "| variant | engine | provider | batch | median ms | p99 ms | samples/s | runs |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['engine']} | {r['provider']} | {r['batch_size']} | {r['median_ms']:.3f} | "
                     f"{r['p99_ms']:.3f} | {r['samples_per_s']:,.0f} | {r['runs']} |")
    return "\n".join(lines) + "\n"


def run(config: Config, rundir: "RunDir", tracker: "Tracker") -> Result:
    tracker.log_params({**config.__dict__, "batch_sizes": ",".join(map(str, config.batch_sizes))})
    variants = read_json(rundir.variants, "quantize")["variants"]
    x_test, _ = dataset.load(rundir.data, rundir.dataset).split("test")
    devices = ["cpu", "cuda"] if config.devices == "auto" and cuda_available() else ["cpu"]
    import torch

    # Same thread budget for both engines, or the comparison measures thread counts, not engines.
    threads = config.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    env = {**environment(), "threads": threads}

    engines = []  # (variant, engine, device, predictor factory)
    if config.include_torch:
        for dev in devices:
            engines.append(("torch", "torch-eager", dev, lambda dev=dev: TorchPredictor(checkpoint.load(rundir.checkpoint)[0], dev)))
    for name, info in variants.items():
        if not info.get("ok"):
            continue
        for dev in devices:
            engines.append((name, "onnxruntime", dev, lambda name=name, dev=dev: OrtPredictor(rundir.variant(name), dev, intra_op_threads=threads)))

    rows, fallbacks = [], []
    for variant, engine, dev, factory in engines:
        predictor = factory()
        provider = predictor.provider
        if engine == "onnxruntime" and dev == "cuda" and provider != CUDA_EP:
            # Requested CUDA, got CPU: never report CPU numbers under a CUDA label.
            log.warning("skipping %s on CUDA: ONNX Runtime fell back to %s", variant, provider)
            fallbacks.append(variant)
            continue
        for bs in config.batch_sizes:
            x = np.resize(x_test, (bs, *x_test.shape[1:])).astype(np.float32)
            row = {"variant": variant, "engine": engine, "device": dev, "provider": provider, "batch_size": bs,
                   **time_calls(predictor.predict, x, config)}
            rows.append(row)
            log.info("%-13s %-11s %-22s batch %4d  median %8.3f ms  p99 %8.3f ms  %10.0f samples/s", variant, engine,
                     provider, bs, row["median_ms"], row["p99_ms"], row["samples_per_s"])
            key = f"{variant}.{provider.replace('ExecutionProvider', '').lower()}.b{bs}"
            tracker.log_metrics({f"median_ms.{key}": row["median_ms"], f"p99_ms.{key}": row["p99_ms"],
                                 f"samples_per_s.{key}": row["samples_per_s"]})

    write_json(rundir.benchmark_json, {"environment": env, "config": config.__dict__, "rows": rows})
    write_text(rundir.benchmark_md, markdown(rows, env))
    tracker.set_tags({"benchmark.cpu": env["cpu"], **({"benchmark.gpu": env["gpu"]} if "gpu" in env else {}),
                      "providers.requested": ",".join(sorted({"CUDAExecutionProvider" if d == "cuda" else "CPUExecutionProvider"
                                                              for d in devices})),
                      "providers.active": ",".join(sorted({r["provider"] for r in rows if r["engine"] == "onnxruntime"})),
                      "providers.cuda_fallback": ",".join(fallbacks) or "none"})
    tracker.log_artifact(rundir.benchmark_json)
    tracker.log_artifact(rundir.benchmark_md)
    return Result(rows=rows)
