"""Write scikit-learn's bundled digits as a folder of image files, to try `dataset: images` without a download.

    .venv/bin/python examples/digit_folder.py data/digit-images              # data/digit-images/<digit>/NNNN.png
    .venv/bin/python examples/digit_folder.py data/digit-splits --splits     # train/ val/ test/ folders
    .venv/bin/python examples/digit_folder.py OUT --side 64 --rgb --format jpg

Each 8x8 digit (intensities 0..16) becomes 8-bit pixels round(v * 255 / 16), resized to SIDE x SIDE
with Pillow's bilinear filter, saved as OUT/<digit>/<index>.png (grayscale; --rgb saves three equal
channels). ``digit_images(side)`` returns exactly the pixels written, so a test can compare prepare's
data.npz with them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

# The split of digit i with --splits: by (i // 10) % 10, as the bundled digits run 0, 1, ..., 9 over and over,
# so each split gets every class.
SPLIT_OF = ("train", "train", "train", "train", "train", "train", "val", "test", "test", "test")


def digit_images(side: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """(pixels uint8 (1797, 1, side, side), labels int64 (1797,)): the bundled digits as the files hold them."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images * 255 / 16).astype(np.uint8)
    if side != 8:
        pixels = np.stack([np.asarray(Image.fromarray(p).resize((side, side), Image.Resampling.BILINEAR))
                           for p in pixels])
    return pixels[:, None], digits.target.astype(np.int64)


def write_digit_folder(out: Path | str, side: int = 28, *, splits: bool = False, rgb: bool = False,
                       fmt: str = "png", count: int = 0) -> list[Path]:
    """Write the digits under ``out`` (``count`` files, cycling through the 1,797; 0: each once); returns
    the files in index order."""
    from PIL import Image

    out = Path(out)
    pixels, labels = digit_images(side)
    n = count or len(labels)
    files = []
    for i in range(n):
        k = i % len(labels)
        folder = out / (SPLIT_OF[(i // 10) % 10] if splits else "") / str(labels[k])
        folder.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(pixels[k, 0])
        path = folder / f"{i:05d}.{fmt}"
        (img.convert("RGB") if rgb else img).save(path)
        files.append(path)
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write (created)")
    parser.add_argument("--side", type=int, default=28, help="pixels per side")
    parser.add_argument("--splits", action="store_true", help="write train/ val/ test/ folders (60/10/30)")
    parser.add_argument("--rgb", action="store_true", help="save RGB files (three equal channels)")
    parser.add_argument("--format", default="png", choices=["png", "jpg", "bmp", "webp"])
    args = parser.parse_args()
    files = write_digit_folder(args.out, args.side, splits=args.splits, rgb=args.rgb, fmt=args.format)
    print(f"wrote {len(files)} {args.format.upper()} files ({args.side}x{args.side}) under {args.out}")


if __name__ == "__main__":
    main()
