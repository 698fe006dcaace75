"""Helpers every stage shares: errors users can act on, atomic writes, JSON, hashes, seeding.

Atomic writes go through a temporary file beside the target named ``.<name>.<pid>.<random>.tmp``
(``atomic_path``); a SIGKILL mid-write leaves it behind, and ``stale_temporaries`` finds those whose
writer is dead so the next pipeline holding the run directory's lock removes them. Scratch folders in
the system's temporary directory are named ``onnx-pipeline-<kind>-<pid>-<random>`` (``scratch_dir``)
for the same reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
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
    """What the command was given must change before it can work (the CLI answers exit 2): a file that
    is there but cannot be used as it is, a store that cannot be reached or used, the recipe's model
    factory or a weights file that does not fit (found only once the stage runs)."""


class BadFile(InputError, ValueError):
    """A file that is there but cannot be used as it is: truncated, corrupt, another format, or changed
    since it was checked. ``fix`` says how to replace it (the orchestrator names the stage that rewrites
    a run directory's file). Also a ValueError: serving takes a bad model file as bad input."""

    def __init__(self, path: Path | str, why: str, fix: str = "replace it with a complete copy"):
        self.path, self.why, self.fix = Path(path), why, fix
        super().__init__(f"{path} {why}; {fix}")

    def with_fix(self, fix: str) -> "BadFile":
        return BadFile(self.path, self.why, fix)


def one_line(text: str, limit: int = 2000) -> str:
    """A library's message as one line: terminal colour codes dropped, whitespace runs (newlines, tabs)
    collapsed, cut at ``limit`` characters (with an ellipsis)."""
    import re

    flat = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(text)).split())
    return flat if len(flat) <= limit else flat[:limit - 1] + "…"


# Test-only: the name of a point at which the process SIGKILLs itself (kill_point). The chaos tests place
# kills where a random moment would rarely land: between two registry writes, between writing a
# temporary file and renaming it.
KILL_AT_ENV = "ONNX_PIPELINE_TEST_KILL_AT"


def kill_point(name: str) -> None:
    """SIGKILL this process here when ONNX_PIPELINE_TEST_KILL_AT names this point (tests only)."""
    if os.environ.get(KILL_AT_ENV) == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


TMP_SUFFIX = ".tmp"
# .<name>.<pid>.<mkstemp's 8 characters>.tmp; before writers put their pid in: .<name>.<8 characters>.tmp
_TEMPORARY = re.compile(r"^\.(?P<name>.+?)(?:\.(?P<pid>\d+))?\.(?P<rand>[a-z0-9_]{8})\.tmp$")
SCRATCH_PREFIX = "onnx-pipeline-"
_SCRATCH = re.compile(r"^onnx-pipeline-(?P<kind>[a-z]+)-(?P<pid>\d+)-(?P<rand>[a-z0-9_]{8})$")


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (another user's counts too)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_temporaries(root: Path) -> list[Path]:
    """Temporary files of ``atomic_path`` under ``root`` whose writer is dead: named by the pattern of
    its temporaries, and either carrying the pid of a process that no longer runs or (written before
    writers put their pid in the name) carrying none. Call it only while holding the directory's lock,
    when no writer of an earlier pipeline can still be at work."""
    found = []
    for path in Path(root).rglob(f".*{TMP_SUFFIX}"):
        m = _TEMPORARY.match(path.name)
        if m and path.is_file() and (m["pid"] is None or (int(m["pid"]) != os.getpid() and not pid_alive(int(m["pid"])))):
            found.append(path)
    return sorted(found)


def scratch_dir(kind: str) -> Path:
    """A new folder in the system's temporary directory, ``onnx-pipeline-<kind>-<pid>-<random>``: the
    caller removes it; one a killed process left is removed later by ``stale_scratch_dirs``' caller."""
    if not kind.isalpha() or not kind.islower():
        raise ValueError(f"scratch kind must be lower-case letters, got {kind!r}")
    return Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{kind}-{os.getpid()}-"))


@contextlib.contextmanager
def scratch(kind: str) -> Iterator[Path]:
    """A ``scratch_dir`` for the block, removed after it (a SIGKILL leaves it to ``stale_scratch_dirs``)."""
    import shutil

    folder = scratch_dir(kind)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def stale_scratch_dirs(parent: Path | None = None) -> list[Path]:
    """Scratch folders (``scratch_dir``) whose process is dead."""
    parent = Path(parent or tempfile.gettempdir())
    found = []
    for path in parent.glob(f"{SCRATCH_PREFIX}*-*-*"):
        m = _SCRATCH.match(path.name)
        if m and path.is_dir() and not path.is_symlink() and not pid_alive(int(m["pid"])):
            found.append(path)
    return sorted(found)


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it into place only if the block succeeds.

    A crash mid-write leaves the previous artifact (if any) intact and no half-written file under
    the final name.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # The writer's pid in the name: a SIGKILL leaves this file, and the next pipeline in the directory
    # removes it once that pid is gone (stale_temporaries).
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.{os.getpid()}.", suffix=TMP_SUFFIX, dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        kill_point(f"write:{final.name}")
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
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadFile(path, f"is corrupt ({e})", f"rerun `pipeline {made_by}` to rewrite it") from None


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
