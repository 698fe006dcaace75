"""Pinned dependencies: every requirement pyproject.toml declares (extras included) has an exact
version in constraints.txt that satisfies it, so `make install` on a fresh clone installs what the
tests last passed with instead of whatever is newest that day."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _pins(path: Path) -> dict[str, Version]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"{path.name}: `{line}` is not an exact pin (name==version); regenerate it with `make lock`"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_every_declared_requirement_is_pinned_in_constraints_txt():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _pins(ROOT / "constraints.txt")
    problems = []
    for extra, requirements in [("", project["dependencies"]), *project["optional-dependencies"].items()]:
        for req in map(Requirement, requirements):
            if req.marker and not req.marker.evaluate({"extra": extra}):
                continue  # another platform's requirement
            if canonicalize_name(req.name) == canonicalize_name(project["name"]):
                continue  # an extra that includes another (full = serve + the training stack)
            pin = pins.get(canonicalize_name(req.name))
            if pin is None:
                problems.append(f"{req.name} is not pinned")
            elif not req.specifier.contains(pin, prereleases=True):
                problems.append(f"{req.name} is pinned to {pin}, outside {req}")
    assert not problems, f"constraints.txt disagrees with pyproject.toml: {'; '.join(problems)}; run `make lock`"


def test_the_triton_clients_venv_is_pinned_too():
    pins = _pins(ROOT / "constraints-triton.txt")
    assert pins[canonicalize_name("tritonclient")] == Version("2.46.0")  # its wheel carries perf_analyzer
    assert canonicalize_name("numpy") in pins


def test_the_serve_extra_is_slim_and_full_includes_it():
    """`pip install onnx-pipeline[serve]` serves without the training stack; `full` (what `make install`
    installs) is serve plus it."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = lambda reqs: {canonicalize_name(Requirement(r).name) for r in reqs}  # noqa: E731
    slim = names(project["dependencies"]) | names(project["optional-dependencies"]["serve"])
    assert not slim & {"torch", "onnx", "onnxscript", "mlflow", "scikit-learn", "matplotlib", "mnist1d"}
    assert "onnx-pipeline[serve]" in project["optional-dependencies"]["full"]
    assert "'.[full,test]'" in (ROOT / "Makefile").read_text()
