"""benchmark: PyTorch eager and every ONNX variant x execution provider x batch size, measured honestly.

For each batch size every contender is created fresh (its cold start: session creation or checkpoint
load, plus the first inference, is timed), warmed up, and its peak memory taken; then all contenders
are timed in interleaved rounds (``timing.interleaved``) until each has both a minimum number of calls
and a minimum time, so the load of a shared machine hits them alike. Rows give median, p90 and p99
latency, samples/s, cold start and peak memory, with the execution provider each session really used
(a CUDA request that fell back to CPU is skipped, never reported under a CUDA label), and the device,
library versions and git commit beside the numbers.

Each variant is fed what its own metadata says (``stages.onnx_model``): raw input when the
preprocessing is in the graph, normalized float32 otherwise. An imported file (no PyTorch model behind
it) has no torch-eager row, and one whose graph fixes the batch dimension is timed at that batch size
only (the log and benchmark.json say so: ``fixed_batch``, ``batch_sizes_requested``). PyTorch eager runs the same wrapper the
fp32 file was exported from (preprocessing and softmax included), on the same input, so both engines
do the same work.
"""

from __future__ import annotations

import gc
import logging
import os
import platform
import time
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np

from stages import checkpoint, conversion, dataset, timing
from stages.common import git_state, library_versions, read_json, require, write_json, write_text
from stages.onnx_model import IMPORTED_FAMILY, ModelMeta, OnnxModel
from stages.predictors import IoBindingPredictor, OrtPredictor, TorchPredictor
from stages.sessions import CUDA_EP, SessionSettings, cuda_available
from stages.contract import RunDir, Tracker


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Config:
    # 256: register's default target (the throughput goal); 1: the latency baseline against PyTorch eager.
    batch_sizes: tuple[int, ...] = (1, 8, 64, 256)
    warmup_runs: int = 20
    min_runs: int = 50
    min_seconds: float = 1.0  # per row, over all rounds: long enough for a stable median on a noisy 2-core machine
    max_seconds: float = 10.0
    rounds: int = 3  # interleaved rounds per batch size (1: each row timed in one go)
    devices: Literal["auto", "cpu"] = "auto"  # auto: CPU, plus CUDA when a GPU is usable
    include_torch: bool = True
    io_binding: bool = True  # on CUDA, also time ONNX Runtime with I/O binding (engine onnxruntime-iobinding)
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
        if self.rounds < 1:
            raise ValueError(f"`rounds` must be >= 1, got {self.rounds}")


@dataclass(frozen=True)
class Result:
    rows: list[dict]

    def summary(self) -> str:
        best = min((r for r in self.rows if r["batch_size"] == min(x["batch_size"] for x in self.rows)),
                   key=lambda r: r["median_ms"])
        where = best["provider"].replace("ExecutionProvider", "")
        return f"{len(self.rows)} rows; batch {best['batch_size']}: {best['variant']} {best['median_ms']:.3f} ms ({where})"


@dataclass(frozen=True)
class Contender:
    variant: str
    engine: str  # torch-eager | onnxruntime | onnxruntime-iobinding
    device: str  # cpu | cuda
    make: Callable[[], tuple[object, Callable[[np.ndarray], np.ndarray]]]  # -> (predictor, raw -> fed input)


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


def session_settings(threads: int, device: str = "cpu") -> SessionSettings:
    """The benchmark's ONNX Runtime sessions: torch's thread budget (so the table compares engines, not
    thread counts) and ORT's default spin-waiting (the harness runs nothing beside the timed call).
    The server's own settings are the recipe's serve.runtime; register re-measures with those."""
    return SessionSettings(device=device, intra_op_threads=threads, allow_spinning=True)


def contenders(config: Config, rundir: "RunDir", variants: dict, devices: list[str], threads: int) -> list[Contender]:
    fp32 = ModelMeta.read(require(rundir.onnx, "export"))  # refuses a file that does not say how to feed it
    softmax = "probabilities" in fp32.output_names

    def torch_eager(dev: str):
        model, meta = checkpoint.load(rundir.checkpoint)
        wrapped = conversion.InGraph(model, fp32.preprocessing, softmax, len(meta["model"]["input_shape"]) + 1)
        return TorchPredictor(wrapped, dev), lambda x: fp32.feed(x)[fp32.input.name]

    def ort(path, dev: str, io_binding: bool):
        predictor = OrtPredictor(path, settings=session_settings(threads, dev))
        meta = OnnxModel(predictor).meta
        return (IoBindingPredictor(predictor) if io_binding else predictor), lambda x: meta.feed(x)[meta.input.name]

    out = []
    if config.include_torch and fp32.family == IMPORTED_FAMILY:
        log.info("no torch-eager row: %s was imported, there is no PyTorch model behind it", rundir.onnx.name)
    for dev in devices:
        if config.include_torch and fp32.family != IMPORTED_FAMILY:
            out.append(Contender("torch", "torch-eager", dev, lambda dev=dev: torch_eager(dev)))
        for name, info in variants.items():
            if not info.get("ok"):
                continue
            path = rundir.root / info["file"] if info.get("file") else rundir.variant(name)
            out.append(Contender(name, "onnxruntime", dev, lambda p=path, d=dev: ort(p, d, False)))
            if dev == "cuda" and config.io_binding:
                out.append(Contender(name, "onnxruntime-iobinding", dev, lambda p=path, d=dev: ort(p, d, True)))
    return out


def _gpu_memory_start(device: str):
    if device != "cuda":
        return None
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.mem_get_info()[0]


def _gpu_memory_mib(device: str, engine: str, free_before) -> float | None:
    """torch: torch.cuda.max_memory_allocated; ONNX Runtime: the drop in free device memory
    (cudaMemGetInfo), which includes its CUDA arena."""
    if device != "cuda":
        return None
    import torch

    torch.cuda.synchronize()
    if engine == "torch-eager":
        return torch.cuda.max_memory_allocated() / 2**20
    return max(0.0, (free_before - torch.cuda.mem_get_info()[0]) / 2**20)


def measure_batch(config: Config, entries: list[Contender], x_raw: np.ndarray, bs: int) -> tuple[list[dict], list[str]]:
    """Every contender at one batch size: cold start, warm-up and memory one by one, then interleaved timing."""
    xb = np.resize(x_raw, (bs, *x_raw.shape[1:]))
    live, fallbacks = [], []
    for c in entries:
        gc.collect()
        before, gpu_before = timing.reset_peak_rss(), _gpu_memory_start(c.device)
        t0 = time.perf_counter()
        predictor, feed = c.make()
        x = feed(xb)
        predictor.predict(x)
        cold_ms = (time.perf_counter() - t0) * 1e3
        if c.engine != "torch-eager" and c.device == "cuda" and predictor.provider != CUDA_EP:
            # Requested CUDA, got CPU: never report CPU numbers under a CUDA label.
            log.warning("skipping %s on CUDA: ONNX Runtime fell back to %s", c.variant, predictor.provider)
            fallbacks.append(c.variant)
            continue
        timing.measure(lambda: predictor.predict(x), warmup=config.warmup_runs, min_runs=0, max_seconds=0)
        live.append((c, predictor, x, {"cold_start_ms": cold_ms, "peak_rss_mib": timing.peak_rss_delta_mib(before),
                                       "gpu_mem_mib": _gpu_memory_mib(c.device, c.engine, gpu_before)}))
    calls = {i: (lambda p=p, x=x: p.predict(x)) for i, (_, p, x, _) in enumerate(live)}
    times = timing.interleaved(calls, rounds=config.rounds, min_runs=config.min_runs, min_seconds=config.min_seconds,
                               max_seconds=config.max_seconds)
    rows = []
    for i, (c, predictor, x, extra) in enumerate(live):
        rows.append({"variant": c.variant, "engine": c.engine, "device": c.device, "provider": predictor.provider,
                     "batch_size": bs, "input_dtype": str(x.dtype), **timing.summarize(times[i], bs), **extra})
    return rows, fallbacks


def markdown(rows: list[dict], env: dict) -> str:
    mem = lambda v: "" if v is None else f"{v:.1f}"
    lines = [f"# Benchmark\n\nCPU: {env['cpu']} ({env['cpu_count']} cores, {env['threads']} threads per engine)"
             f"{'; GPU: ' + env['gpu'] if 'gpu' in env else ''}; onnxruntime {env.get('onnxruntime-gpu') or env.get('onnxruntime')}, "
             f"torch {env.get('torch')}, commit {env['git.commit'][:12]}{' (dirty)' if env.get('git.dirty') == 'True' else ''}\n",
             f"Latency per call, host arrays in and out; samples/s at the median. Cold start: session creation "
             f"(torch: checkpoint load) + first inference. Peak RSS: {timing.MEMORY_METHOD}. GPU MiB: "
             "torch.cuda.max_memory_allocated (torch), drop in free device memory (ONNX Runtime).\n",
             "| variant | engine | provider | batch | input | median ms | p90 ms | p99 ms | samples/s | cold start ms "
             "| peak RSS MiB | GPU MiB | runs |",
             "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['engine']} | {r['provider']} | {r['batch_size']} | {r['input_dtype']} | "
                     f"{r['median_ms']:.3f} | {r['p90_ms']:.3f} | {r['p99_ms']:.3f} | {r['samples_per_s']:,.0f} | "
                     f"{r['cold_start_ms']:.1f} | {mem(r['peak_rss_mib'])} | {mem(r['gpu_mem_mib'])} | {r['runs']} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path) -> None:
    """samples/s per variant (grouped bars) at each batch size, one panel per device (CPU, CUDA); log scale."""
    from stages.metrics import _pyplot, _save

    plt = _pyplot()
    devices = sorted({r["device"] for r in rows})
    batches = sorted({r["batch_size"] for r in rows})
    labels = list(dict.fromkeys(f"{r['variant']} ({r['engine']})" if r["engine"] != "onnxruntime" else r["variant"]
                                for r in rows))
    fig, axes = plt.subplots(1, len(devices), figsize=(4 + 2.2 * len(batches) * len(devices), 4), dpi=110, squeeze=False)
    width = 0.8 / max(1, len(labels))
    for ax, dev in zip(axes[0], devices):
        for j, label in enumerate(labels):
            values = []
            for bs in batches:
                match = [r for r in rows if r["batch_size"] == bs and r["device"] == dev
                         and (f"{r['variant']} ({r['engine']})" if r["engine"] != "onnxruntime" else r["variant"]) == label]
                values.append(match[0]["samples_per_s"] if match else 0.0)
            ax.bar(np.arange(len(batches)) + j * width, values, width, label=label)
        ax.set_xticks(np.arange(len(batches)) + width * (len(labels) - 1) / 2, [str(b) for b in batches])
        ax.set(xlabel="batch size", ylabel="samples/s (median)", title=dev.upper(), yscale="log")
    axes[0][-1].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    _save(fig, path)


def runnable_batch_sizes(requested: tuple[int, ...], fixed: int | None) -> tuple[int, ...]:
    """The batch sizes to time: the requested ones, or only ``fixed`` for a graph that takes exactly
    that many rows (saying so, rather than failing at the first other size)."""
    if fixed is None or tuple(requested) == (fixed,):
        return tuple(requested)
    log.warning("the model's batch dimension is fixed at %d: benchmarking at batch %d only (benchmark.batch_sizes "
                "%s do not apply)", fixed, fixed, list(requested))
    return (fixed,)


def run(config: Config, rundir: "RunDir", tracker: "Tracker") -> Result:
    tracker.log_params({**config.__dict__, "batch_sizes": ",".join(map(str, config.batch_sizes))})
    variants = read_json(rundir.variants, "quantize")["variants"]
    x_raw, _ = dataset.load(rundir.data, rundir.dataset).split("test", normalized=False)
    devices = ["cpu", "cuda"] if config.devices == "auto" and cuda_available() else ["cpu"]
    import torch

    # Same thread budget for both engines, or the comparison measures thread counts, not engines.
    threads = config.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    env = {**environment(), "threads": threads, "memory_method": timing.MEMORY_METHOD, "rounds": config.rounds,
           "onnxruntime_session": {k: v for k, v in session_settings(threads).describe().items() if k != "device"}}
    entries = contenders(config, rundir, variants, devices, threads)
    batch_sizes = runnable_batch_sizes(config.batch_sizes, ModelMeta.read(rundir.onnx).fixed_batch)
    env.update(fixed_batch=ModelMeta.read(rundir.onnx).fixed_batch, batch_sizes_requested=list(config.batch_sizes))

    rows, fallbacks = [], set()
    for bs in batch_sizes:
        found, fell_back = measure_batch(config, entries, x_raw, bs)
        fallbacks.update(fell_back)
        for row in found:
            rows.append(row)
            log.info("%-13s %-21s %-22s batch %4d  median %8.3f ms  p90 %8.3f ms  %10.0f samples/s  cold %7.1f ms",
                     row["variant"], row["engine"], row["provider"], bs, row["median_ms"], row["p90_ms"],
                     row["samples_per_s"], row["cold_start_ms"])
            engine = "" if row["engine"] == "onnxruntime" else "." + row["engine"]
            key = f"{row['variant']}{engine}.{row['provider'].replace('ExecutionProvider', '').lower()}.b{bs}"
            tracker.log_metrics({f"{m}.{key}": row[m] for m in ("median_ms", "p90_ms", "p99_ms", "samples_per_s",
                                                              "cold_start_ms", "peak_rss_mib") if row[m] is not None})

    write_json(rundir.benchmark_json, {"environment": env, "config": config.__dict__, "rows": rows})
    write_text(rundir.benchmark_md, markdown(rows, env))
    plot(rows, rundir.benchmark_png)
    tracker.set_tags({"benchmark.cpu": env["cpu"], **({"benchmark.gpu": env["gpu"]} if "gpu" in env else {}),
                      "providers.requested": ",".join(sorted({"CUDAExecutionProvider" if d == "cuda" else "CPUExecutionProvider"
                                                              for d in devices})),
                      "providers.active": ",".join(sorted({r["provider"] for r in rows if r["engine"] != "torch-eager"})),
                      "providers.cuda_fallback": ",".join(sorted(fallbacks)) or "none"})
    for path in (rundir.benchmark_json, rundir.benchmark_md, rundir.benchmark_png):
        tracker.log_artifact(path)
    return Result(rows=rows)
