"""Shared fixtures: an isolated MLflow store for the whole session, a tiny recipe, and a run
directory taken through the stages once (session-scoped: later stages build on earlier ones)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Never write to the project's mlruns/: every test process gets a temporary store unless a test
# sets its own. Set before anything imports mlflow.
_STORE = Path(tempfile.mkdtemp(prefix="onnx-pipeline-test-mlflow-"))
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_STORE}/mlflow.db"
os.environ.setdefault("MPLBACKEND", "Agg")

TINY = {
    "name": "tiny",
    "model": {"family": "cnn", "channels": [8, 16], "pool_after": 1, "hidden": 32},
    "train": {"epochs": 4, "batch_size": 64, "lr": 0.01, "warmup_epochs": 0, "device": "cpu"},
    "quantize": {"calibration_samples": 64, "prune_lr": 0.003},  # the tiny CNN trains at lr 0.01
    "benchmark": {"batch_sizes": [1, 8], "warmup_runs": 2, "min_runs": 5, "min_seconds": 0.02},
    "register": {"model_name": "tiny", "target_batch_size": 1, "remeasure_rounds": 2, "remeasure_seconds": 0.05},
    # Not the machine default on small machines (off there): register must measure with this, as the server runs.
    "serve": {"runtime": {"allow_spinning": True}},
}


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_STORE, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_recipe():
    from pipeline.config import recipe_from_dict

    return recipe_from_dict(TINY)


@pytest.fixture(scope="session")
def tiny_yaml(tmp_path_factory) -> Path:
    import yaml

    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def _stage_fixture(stage: str, after: str | None):
    @pytest.fixture(scope="session")
    def fixture(request, tiny_recipe, tmp_path_factory):
        from pipeline.orchestrate import run_stage
        from stages.contract import RunDir

        rundir = request.getfixturevalue(after) if after else RunDir(tmp_path_factory.mktemp("run")).ensure()
        run_stage(stage, tiny_recipe, rundir, track=False)
        return rundir

    return fixture


# Each fixture returns the same run directory, taken one stage further.
prepared = _stage_fixture("prepare", None)
trained = _stage_fixture("train", "prepared")
evaluated = _stage_fixture("evaluate", "trained")
exported = _stage_fixture("export", "evaluated")
quantized = _stage_fixture("quantize", "exported")
benchmarked = _stage_fixture("benchmark", "quantized")


@pytest.fixture
def copy_of(tmp_path):
    """A private copy of a shared run directory, for tests that damage files."""
    from stages.contract import RunDir

    def copy(rundir) -> RunDir:
        dst = tmp_path / "copy"
        shutil.copytree(rundir.root, dst)
        return RunDir(dst)

    return copy
