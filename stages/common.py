"""Helpers every stage shares: errors users can act on, atomic writes, JSON, hashes, seeding."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np


def _product_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("onnx-pipeline")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0+source"


PRODUCT_VERSION = _product_version()


class StageError(RuntimeError):
    """A stage cannot go on for a reason the user can fix; the message says what and how."""


class InputError(StageError):
    """A StageError whose fix is to change what the command was given (the recipe's model factory, a
    weights file), found only once the stage runs: the CLI exits 2 for it, as for a bad recipe key."""


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it into place only if the block succeeds.

    A crash mid-write leaves the previous artifact (if any) intact and no half-written file under
    the final name.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_json(path: Path, data: Any) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")
    return Path(path)


def write_text(path: Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def read_json(path: Path, made_by: str) -> Any:
    """Read a JSON artifact, or explain which command makes it."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path} not found; run `pipeline {made_by}` first (or `pipeline run`)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise StageError(f"{path} is corrupt ({e}); rerun `pipeline {made_by}` to rewrite it") from None


def require(path: Path, made_by: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path} not found; run `pipeline {made_by}` first (or `pipeline run`)")
    return path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def library_versions(dists=("torch", "onnx", "onnxruntime-gpu", "onnxruntime", "mlflow", "numpy")) -> dict[str, str]:
    """Installed versions of the libraries whose versions change the numbers; absent ones left out."""
    import importlib.metadata as md

    found = {}
    for dist in dists:
        try:
            found[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return found


def git_state() -> dict[str, str]:
    """The commit of the code that ran, and whether the working tree had uncommitted changes."""
    import subprocess

    try:
        run = lambda *args: subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                                           check=True).stdout.strip()
        return {"git.commit": run("rev-parse", "HEAD"),
                "git.dirty": str(bool(run("status", "--porcelain", "--untracked-files=no")))}
    except Exception:
        return {"git.commit": "unknown", "git.dirty": "unknown"}


def stamp_onnx(path: Path, props: dict[str, str], doc: str | None = None) -> None:
    """Set ``metadata_props`` (and optionally the doc string) of an ONNX file in place, then check it."""
    import onnx


    model = onnx.load(str(path))
    existing = {p.key: p for p in model.metadata_props}
    for k, v in props.items():
        if k in existing:
            existing[k].value = str(v)
        else:
            model.metadata_props.add(key=k, value=str(v))
    if doc is not None:
        model.doc_string = doc
    model.producer_name = "onnx-pipeline"
    model.producer_version = PRODUCT_VERSION
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
