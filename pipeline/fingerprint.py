"""Stage fingerprints: what a stage's result depends on, hashed, so an unchanged stage is reused.

A fingerprint is a flat table of *components*, each a name and a short value:

- ``recipe:<section>.<key>``   every value of the recipe sections the stage reads (JSON of the value)
- ``option:<name>``            command-line options that change the result (``--device``) or the store
- ``file:<name>``              the sha256 of each run-directory file the stage reads ("absent" if missing)
- ``code:<path>``              the sha256 of the stage's module and of every project module it imports,
                               transitively (found by reading their ``import`` lines; models/ comes in
                               whole through models/__init__, which imports every family)
- ``lib:<dist>``               the installed versions of the libraries that change numbers
- ``code:<path>`` of user code  a custom model's factory module and the modules it imports from its own
                               top-level package, transitively (``user_code_components``); a factory
                               from an installed library counts by that library's version instead

The digest is the sha256 of the sorted table. Keeping the table (not only the digest) lets
``pipeline run --explain`` name what changed: ``recipe key train.epochs 4 -> 5``, ``upstream file
checkpoint.pt``, ``code of stages/train.py``.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
import platform
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from stages.common import library_versions, sha256_file

# The packages whose sources count as code; imports of anything else count through library versions.
PROJECT_PACKAGES = ("stages", "models")
# Libraries whose version changes what a stage produces.
LIBRARIES = ("torch", "onnx", "onnxruntime-gpu", "onnxruntime", "onnxscript", "numpy", "scikit-learn", "mlflow")


@dataclass(frozen=True)
class Fingerprint:
    digest: str
    components: dict[str, str]

    @staticmethod
    def of(components: Mapping[str, str]) -> "Fingerprint":
        blob = json.dumps(dict(sorted(components.items())), sort_keys=True).encode()
        return Fingerprint(hashlib.sha256(blob).hexdigest(), dict(sorted(components.items())))


def _flat(value: Any, prefix: str) -> dict[str, str]:
    if isinstance(value, Mapping):
        out: dict[str, str] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}.{k}"))
        return out
    return {prefix: json.dumps(value, sort_keys=True, default=str)}


def file_hash(path: Path) -> str:
    return sha256_file(path) if Path(path).is_file() else "absent"


# ---------------------------------------------------------------- code version

def _module_file(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec is not None and spec.origin and spec.origin.endswith(".py") else None


def _project_imports(path: Path, packages: tuple[str, ...] = PROJECT_PACKAGES, module: str = "") -> set[str]:
    """Modules of ``packages`` that ``path`` imports (``from stages import x``, ``from stages.x import y``,
    ``import models``); with ``module`` (the dotted name ``path`` is imported as) relative imports too."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from stages import dataset` may name a submodule: try both the module and module.name.
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level > 0 and package:
            parts = package.split(".")
            base = ".".join(parts[:len(parts) - (node.level - 1)]) if node.level - 1 < len(parts) else ""
            if not base:
                continue
            origin = f"{base}.{node.module}" if node.module else base
            names = [origin] + [f"{origin}.{a.name}" for a in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in packages)
    return found


@functools.lru_cache(maxsize=None)
def code_files(modules: tuple[str, ...]) -> tuple[Path, ...]:
    """The source files of ``modules`` and of every project module they import, transitively."""
    seen: dict[str, Path] = {}
    todo = list(modules)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _module_file(name)
        if path is None:
            continue
        seen[name] = path
        todo.extend(_project_imports(path))
        parent = name.rpartition(".")[0]
        if parent:
            todo.append(parent)  # a package's __init__ runs on import
    # models/__init__ imports every family, so a stage that builds models depends on all of models/;
    # one that never imports models (prepare) does not rerun when a model file changes.
    return tuple(sorted(set(seen.values())))


def _code_root() -> Path:
    return (_module_file("stages") or Path(__file__)).parent.parent


@functools.lru_cache(maxsize=None)
def _source_hash(path: Path, mtime_ns: int) -> str:
    return sha256_file(path)


def code_components(modules: Iterable[str]) -> dict[str, str]:
    root = _code_root()
    out = {}
    for path in code_files(tuple(sorted(modules))):
        try:
            rel = path.relative_to(root).as_posix()
        except ValueError:
            rel = path.as_posix()
        out[f"code:{rel}"] = _source_hash(path, path.stat().st_mtime_ns)
    return out


def _installed(path: Path) -> bool:
    """Does ``path`` lie in an installed distribution (site-packages), not in the user's tree?"""
    libs = {Path(p).resolve() for key in ("purelib", "platlib", "stdlib") if (p := sysconfig.get_paths().get(key))}
    resolved = path.resolve()
    return any(resolved.is_relative_to(lib) for lib in libs) or "site-packages" in resolved.parts


def user_code_components(modules: Iterable[str]) -> dict[str, str]:
    """The user's modules (a custom model's factory), hashed: each module's source and the modules it
    imports from its own top-level package, transitively (read fresh each time: the user edits them).
    A module installed as a library counts by its distribution's version (``lib:<dist>``); one that does
    not import counts as absent (the stage then fails on it with its own message)."""
    import importlib.metadata

    from models import custom

    custom.importable_here()  # the factory is imported from the working directory: find it there too
    root, out = _code_root(), {}
    for module in modules:
        top = module.split(".")[0]
        path = _module_file(module)
        if path is None:
            out[f"code:{module}"] = "absent"
            continue
        if _installed(path):
            dists = importlib.metadata.packages_distributions().get(top, [top])
            out.update({f"lib:{d}": v for d, v in library_versions(tuple(dists)).items()})
            continue
        seen: dict[str, Path] = {}
        todo = [module]
        while todo:
            name = todo.pop()
            if name in seen or (found := _module_file(name)) is None or _installed(found):
                continue
            seen[name] = found
            todo.extend(n for n in _project_imports(found, (top,), name) if n not in seen)
            if "." in name:
                todo.append(name.rpartition(".")[0])  # a package's __init__ runs on import
        for path in sorted(set(seen.values())):
            try:
                rel = path.resolve().relative_to(root.resolve()).as_posix()
            except ValueError:
                rel = path.as_posix()
            out[f"code:{rel}"] = sha256_file(path)
    return out


@functools.lru_cache(maxsize=1)
def library_components() -> dict[str, str]:
    return {"lib:python": platform.python_version(),
            **{f"lib:{dist}": v for dist, v in library_versions(LIBRARIES).items()}}


# ---------------------------------------------------------------- the whole fingerprint

def compute(*, sections: Mapping[str, Any], options: Mapping[str, Any], files: Mapping[str, Path],
            modules: Iterable[str], user_modules: Iterable[str] = ()) -> Fingerprint:
    """``sections``: recipe section name -> its plain dict; ``files``: name shown -> path read;
    ``user_modules``: the user's modules the stage runs (a custom model's factory)."""
    comps: dict[str, str] = {}
    for name, value in sections.items():
        comps.update({f"recipe:{k}": v for k, v in _flat(value, name).items()})
    comps.update({f"option:{k}": json.dumps(v, default=str) for k, v in options.items()})
    comps.update({f"file:{name}": file_hash(path) for name, path in files.items()})
    comps.update(code_components(modules))
    comps.update(user_code_components(user_modules))
    comps.update(library_components())
    return Fingerprint.of(comps)


def explain(old: Mapping[str, str] | None, new: Mapping[str, str]) -> list[str]:
    """What differs between two component tables, in words, most telling first."""
    if not old:
        return ["no earlier run of this stage in this run directory"]
    reasons = []
    kinds = {"recipe": "recipe key", "option": "option", "file": "upstream file", "code": "code of",
             "lib": "library"}
    for key in sorted(set(old) | set(new), key=lambda k: (list(kinds).index(k.split(":")[0])
                                                          if k.split(":")[0] in kinds else 9, k)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        kind, _, name = key.partition(":")
        label = kinds.get(kind, kind)
        if kind in ("recipe", "option", "lib"):
            reasons.append(f"{label} {name}: {a if a is not None else '(unset)'} -> {b if b is not None else '(unset)'}")
        elif kind == "file":
            reasons.append(f"{label} {name} changed ({(a or 'absent')[:8]} -> {(b or 'absent')[:8]})")
        else:
            what = "added" if a is None else "removed" if b is None else "changed"
            reasons.append(f"{label} {name} {what}")
    return reasons or ["fingerprint differs"]
