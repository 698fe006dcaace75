"""How long prepare takes to decode a folder of images, serially and in parallel.

    .venv/bin/python benchmarks/image_decode.py                       # 10,000 PNGs, 28x28 grayscale
    .venv/bin/python benchmarks/image_decode.py --count 2000 --side 256 --format jpg --target 64 --channels 3

Writes COUNT images (scikit-learn's bundled digits, upscaled to SIDE x SIDE, cycling through the 1,797
of them, one folder per class: examples/digit_folder.py) to a temporary directory, then times ``stages.images.decode_many`` in
this process, in a thread pool and in a process pool (median of --repeat runs each), and the whole
``prepare`` stage (``dataset: images`` with its automatic choice of workers, ``images.auto_workers``). Prints the machine,
Pillow's version and a table; nothing is kept.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(fn, repeat: int) -> float:
    seconds = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--side", type=int, default=28, help="pixels of the written images (square)")
    parser.add_argument("--target", type=int, default=0, help="resize to this side while decoding (0: keep)")
    parser.add_argument("--format", choices=["png", "jpg", "bmp", "webp"], default="png")
    parser.add_argument("--channels", type=int, choices=[1, 3], default=1)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    import PIL

    from examples.digit_folder import write_digit_folder
    from stages import images, prepare
    from stages.contract import NullTracker, RunDir

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with tempfile.TemporaryDirectory(prefix="onnx-pipeline-images-") as tmp:
        folder = Path(tmp) / "digits"
        started = time.perf_counter()
        write_digit_folder(folder, args.side, rgb=args.channels == 3, fmt=args.format, count=args.count)
        wrote = time.perf_counter() - started
        paths, _ = images.list_images(folder)
        size = (args.target, args.target) if args.target else (args.side, args.side)
        rows = []
        cases = [("serial (this process)", 1, "thread")]
        for n in sorted({2, cores}):
            cases += [(f"{n} threads", n, "thread"), (f"{n} processes", n, "process")]
        for label, workers, pool in cases:
            seconds = timed(lambda: images.decode_many(paths, size, args.channels, workers=workers, pool=pool),
                            args.repeat)
            rows.append((label, seconds))
        config = prepare.Config(dataset="images", path=str(folder),
                                images=prepare.ImagesConfig(size=size, channels=args.channels))

        def run_prepare() -> None:
            prepare.run(config, RunDir(Path(tmp) / "run").ensure(), NullTracker())

        rows.append(("prepare stage (workers: auto)", timed(run_prepare, args.repeat)))

    print(f"machine: {platform.processor() or platform.machine()}, {cores} cores usable, load average "
          f"{os.getloadavg()[0]:.1f}; Python {platform.python_version()}, Pillow {PIL.__version__}")
    print(f"{args.count} {args.format.upper()} files, {args.side}x{args.side}, {args.channels} channel(s), decoded to "
          f"{size[0]}x{size[1]} (writing them took {wrote:.1f} s); median of {args.repeat} runs\n")
    serial = rows[0][1]
    print(f"| {'how':<34} | seconds | images/s | vs serial |")
    print(f"|{'-' * 36}|---------|----------|-----------|")
    for label, seconds in rows:
        print(f"| {label:<34} | {seconds:7.2f} | {args.count / seconds:8,.0f} | {serial / seconds:8.2f}x |")


if __name__ == "__main__":
    main()
