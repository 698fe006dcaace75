"""Recipes: loading, overrides, and one clear error per mistake (also through the CLI, exit code 2)."""

import subprocess
import sys

import pytest

from pipeline.config import ConfigError, load_recipe, recipe_from_dict
from tests.conftest import ROOT, TINY

DEFAULT = ROOT / "configs" / "digits-cnn.yaml"


def test_default_recipe_loads_into_typed_configs():
    r = load_recipe(DEFAULT)
    assert r.name == "digits-cnn"
    assert r.model.family == "cnn" and r.model.config.channels == (32, 64, 64)
    assert r.train.epochs == 40 and isinstance(r.train.lr, float)
    assert r.export.check_batch_sizes == (1, 2, 37)
    assert r.quantize.variants == ("all",) and r.quantize.accuracy_budget == 0.5
    assert r.serve.transport.host == "127.0.0.1" and r.serve.batching.max_batch_size == 64


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_is_valid(path):
    assert load_recipe(path).name == path.stem


def test_overrides_are_parsed_and_validated():
    r = load_recipe(DEFAULT, ["train.epochs=3", "benchmark.batch_sizes=[1, 4]", "train.lr=1e-3", "model.hidden=64"])
    assert r.train.epochs == 3 and r.train.lr == 0.001
    assert r.benchmark.batch_sizes == (1, 4)
    assert r.model.config.hidden == 64


def test_recipe_round_trips_through_its_dict():
    r = recipe_from_dict(TINY)
    assert recipe_from_dict(r.to_dict()) == r


@pytest.mark.parametrize("override, fragment", [
    ("train.epoch=3", "unknown key `train.epoch`"),
    ("trian.epochs=3", "unknown key `trian`"),
    ("train.lr=-1", "`train.lr` must be > 0, got -1"),
    ("train.epochs=abc", "`train.epochs` must be an integer"),
    ("train.device=tpu", "`train.device` must be one of auto, cpu, cuda"),
    ("model.family=resnet", "`model.family` must be one of"),
    ("model.channels=[0]", "`model.channels` must be a non-empty list of positive ints"),
    ("quantize.variants=[int3]", "`quantize.variants` has unknown names ['int3']"),
    ("serve.transport.port=0", "`serve.transport.port` must be an integer between 1 and 65535, got 0"),
    ("serve.port=8001", "`serve.port` moved to `serve.transport.port`"),
    ("serve.batching.max_batch_sise=8", "unknown key `serve.batching.max_batch_sise`; valid keys in `serve.batching`"),
    ("train", "must look like section.key=value"),
])
def test_bad_values_name_the_key_and_the_fix(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_recipe(DEFAULT, [override])
    assert fragment in str(e.value)


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="valid keys in `train`: .*epochs"):
        load_recipe(DEFAULT, ["train.epoch=3"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(bad)


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_cli_bad_recipe_is_one_line_exit_2_without_traceback():
    p = _cli("run", "--recipe", str(DEFAULT), "--set", "train.epoch=3", "--no-track")
    assert p.returncode == 2
    assert "unknown key `train.epoch`" in p.stderr
    assert "Traceback" not in p.stderr + p.stdout


def test_cli_missing_recipe_file_exit_2(tmp_path):
    p = _cli("train", "--recipe", str(tmp_path / "missing.yaml"), "--no-track")
    assert p.returncode == 2 and "not found" in p.stderr and "Traceback" not in p.stderr


def test_cli_stage_without_its_input_says_which_command_makes_it(tmp_path):
    p = _cli("train", "--recipe", str(DEFAULT), "--workdir", str(tmp_path), "--no-track")
    assert p.returncode == 1
    assert "run `pipeline prepare` first" in p.stderr and "Traceback" not in p.stderr


def test_cli_help_lists_every_stage():
    p = _cli("--help")
    assert p.returncode == 0
    for cmd in ("prepare", "train", "evaluate", "export", "quantize", "benchmark", "register", "run", "serve"):
        assert cmd in p.stdout


@pytest.mark.parametrize("model, fragment", [
    ("missing.onnx", "model file 'missing.onnx' not found"),
    ("bad.onnx", "not a valid ONNX model"),
    ("models:/nobody@champion", "run `make all` (or `pipeline run`) to register a model"),
])
def test_cli_serve_refuses_a_bad_model_in_one_line(tmp_path, model, fragment):
    (tmp_path / "bad.onnx").write_bytes(b"garbage")
    p = _cli("serve", "--model", model, "--recipe", str(DEFAULT), cwd=tmp_path)
    assert p.returncode == 2 and fragment in p.stderr and "Traceback" not in p.stderr
