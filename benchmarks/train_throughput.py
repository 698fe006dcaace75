"""Training throughput (samples/s) of the CNN on MNIST-shaped data: GPU-resident data vs a plain DataLoader.

    python benchmarks/train_throughput.py                      # auto device, 30 s per path at most
    python benchmarks/train_throughput.py --device cuda --epochs 3 --seconds 60 [--compile]
    python benchmarks/train_throughput.py --idx ~/data/mnist   # real MNIST IDX files instead of synthetic data

Both paths train the same model (models/cnn.py, 3 conv blocks, ~100k parameters) from the same
initial weights on the same 60,000 x 1x28x28 inputs, one after the other in one process:

- dataloader: the plain reference loop: a TensorDataset on the host, DataLoader(batch 128, shuffle,
  2 workers, pinned memory), a host->device copy per batch, fp32, ``loss.item()`` per step.
- resident: what stages/train.py does when the split fits on the device: the split on the device once,
  an index permutation drawn on the device, a batch is one gather, large batch (512), bf16 autocast on
  CUDA, channels_last on CUDA, fused AdamW on CUDA, loss summed on the device and read once per epoch,
  optionally torch.compile.

Each path warms up (cuDNN autotuning, compilation) for ``--warmup-steps`` steps, then trains for
``--epochs`` epochs or ``--seconds`` seconds, whichever ends first; time is taken after a device
synchronization. Prints a table with the device, versions and the ratio.
"""

from __future__ import annotations

import argparse
import gzip
import math
import platform
import struct
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

N, H, W, CLASSES = 60_000, 28, 28, 10


def synthetic(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic MNIST-shaped data: each class a fixed random blob pattern plus per-sample noise and
    shifts, so the model has something to learn (the speed does not depend on it)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, N).astype(np.int64)
    templates = rng.random((CLASSES, H, W)).astype(np.float32) > 0.8
    x = templates[y].astype(np.float32) * 200.0
    x += rng.normal(0.0, 30.0, x.shape).astype(np.float32)
    return np.clip(x, 0, 255).astype(np.uint8)[:, None], y


def read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08:
        raise SystemExit(f"{path}: not an unsigned-byte IDX file (magic {raw[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def from_idx(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    def find(stem: str) -> Path:
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
        raise SystemExit(f"{folder} lacks {stem}[.gz]")

    x = read_idx(find("train-images-idx3-ubyte"))[:, None]
    y = read_idx(find("train-labels-idx1-ubyte")).astype(np.int64)
    if len(x) != len(y):
        raise SystemExit(f"{folder}: {len(x)} images but {len(y)} labels")
    return x, y


def build_model(channels: tuple[int, ...], hidden: int, device: str):
    import torch

    import models
    from models import cnn

    torch.manual_seed(0)  # the same initial weights for both paths
    return models.build("cnn", cnn.Config(channels=channels, pool_after=1, hidden=hidden, dropout=0.0),
                        (1, H, W), CLASSES).to(device)


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_dataloader(x_u8, y, device, args) -> dict:
    """The plain reference loop."""
    import torch
    import torch.nn.functional as F

    x = (torch.from_numpy(x_u8).float() - 33.3) / 78.6  # normalized on the host, once
    ds = torch.utils.data.TensorDataset(x, torch.from_numpy(y))
    loader = torch.utils.data.DataLoader(ds, batch_size=args.loader_batch, shuffle=True, num_workers=args.workers,
                                         pin_memory=device.startswith("cuda"), persistent_workers=args.workers > 0,
                                         generator=torch.Generator().manual_seed(0))
    model = build_model(args.channels, args.hidden, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(xb, yb):
        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()  # the classic per-step read (a host-device sync)

    def batches():
        while True:
            yield from loader

    return timed(step, batches(), len(ds), args.loader_batch, device, args,
                 settings=f"batch {args.loader_batch}, {args.workers} workers, "
                          f"{'pinned, ' if device.startswith('cuda') else ''}fp32, item/step")


def run_resident(x_u8, y, device, args) -> dict:
    """The train stage's resident path."""
    import torch
    import torch.nn.functional as F

    cuda = device.startswith("cuda")
    bf16 = cuda and not args.no_bf16
    channels_last = cuda and not args.no_channels_last
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    x = ((torch.from_numpy(x_u8).to(device).float() - 33.3) / 78.6).contiguous(memory_format=fmt)
    y_dev = torch.from_numpy(y).to(device)
    model = build_model(args.channels, args.hidden, device).to(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, **({"fused": True} if cuda else {}))
    fwd = torch.compile(model) if args.compile else model
    gen = torch.Generator(device=device).manual_seed(0)
    loss_sum = torch.zeros((), device=device)

    def step(idx, _):
        nonlocal loss_sum
        xb, yb = x[idx], y_dev[idx]
        with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(fwd(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += loss.detach()  # read once at the end, never per step
        return None

    def batches():
        while True:
            order = torch.randperm(len(x), generator=gen, device=device)
            for idx in order.split(args.resident_batch):
                yield idx, None

    out = timed(step, batches(), len(x), args.resident_batch, device, args,
                settings=f"batch {args.resident_batch}, {'bf16' if bf16 else 'fp32'}"
                         f"{', channels_last' if channels_last else ''}{', fused AdamW' if cuda else ''}"
                         f"{', compiled' if args.compile else ''}, no per-step sync")
    out["final_loss_sum"] = float(loss_sum)
    return out


def timed(step, batches, n, batch, device, args, settings: str) -> dict:
    for _ in range(args.warmup_steps):
        step(*next(batches))
    sync(device)
    max_steps = args.epochs * math.ceil(n / batch)
    t0, steps, samples = time.perf_counter(), 0, 0
    while steps < max_steps:
        a, b = next(batches)
        step(a, b)
        steps += 1
        samples += len(a)
        if time.perf_counter() - t0 > args.seconds:  # host clock only: no device synchronization
            break
    sync(device)
    seconds = time.perf_counter() - t0
    return {"settings": settings, "steps": steps, "samples": samples, "seconds": seconds,
            "samples_per_s": samples / seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--epochs", type=int, default=3, help="epochs per path at most")
    p.add_argument("--seconds", type=float, default=30.0, help="timed seconds per path at most")
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--idx", type=Path, help="folder with train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz]")
    p.add_argument("--loader-batch", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--resident-batch", type=int, default=512)
    p.add_argument("--compile", action="store_true", help="torch.compile the resident path's model")
    p.add_argument("--no-bf16", action="store_true")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--channels", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--hidden", type=int, default=64)
    args = p.parse_args()
    args.channels = tuple(args.channels)

    import torch

    from stages.common import git_state, library_versions

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA GPU")
    if args.idx:
        x, y = from_idx(args.idx)
        source = f"IDX files from {args.idx} ({len(x)} samples)"
    else:
        x, y = synthetic()
        source = f"synthetic, deterministic (numpy seed 0), {N} x 1x{H}x{W} uint8, {CLASSES} classes: no MNIST download"
    params = sum(p.numel() for p in build_model(args.channels, args.hidden, "cpu").parameters())
    name = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({platform.processor() or platform.machine()}, " \
                                                                     f"{torch.get_num_threads()} threads)"
    print(f"device: {name}")
    print(f"versions: python {platform.python_version()}, " + ", ".join(f"{k} {v}" for k, v in library_versions().items())
          + (f", CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}" if device == "cuda" else "")
          + f", git {git_state()['git.commit'][:10]}")
    print(f"data: {source}")
    print(f"model: cnn channels {list(args.channels)}, pool after block 1, hidden {args.hidden}: {params:,} parameters")
    print(f"budget per path: {args.warmup_steps} warm-up steps, then {args.epochs} epochs or {args.seconds:g} s")
    rows = {"dataloader": run_dataloader(x, y, device, args), "resident": run_resident(x, y, device, args)}
    print()
    print(f"{'path':<11} {'samples/s':>11} {'samples':>8} {'seconds':>8}  settings")
    for path, r in rows.items():
        print(f"{path:<11} {r['samples_per_s']:>11,.0f} {r['samples']:>8} {r['seconds']:>8.1f}  {r['settings']}")
    ratio = rows["resident"]["samples_per_s"] / rows["dataloader"]["samples_per_s"]
    print(f"\nresident / dataloader: {ratio:.2f}x on {name}")


if __name__ == "__main__":
    main()
