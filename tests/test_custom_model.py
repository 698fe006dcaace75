"""Your own model and pretrained weights: a custom factory through train -> export's parity gate, its
module in train's fingerprint, one error per kind of bad factory (exit 2 from the CLI), torchvision/timm
by name, fine-tuning from a .pt and a .safetensors file with the loaded/skipped/missing report (in the
run directory and in MLflow), strict loading refusing, the frozen backbone really frozen, parameter
groups' learning rates, and prepare's class subsets."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

import models
from pipeline.config import ConfigError, recipe_from_dict
from stages import checkpoint, export, optim, prepare, train
from stages.common import InputError, StageError
from stages.contract import NullTracker, RunDir
from tests.conftest import TINY

EXAMPLE = "examples.custom_model.resnet:build"
TINY_EXAMPLE = {"family": "custom", "factory": EXAMPLE, "kwargs": {"width": 4, "blocks": 1, "dropout": 0.0}}
FAST = {"epochs": 1, "batch_size": 64, "lr": 0.01, "warmup_epochs": 0, "device": "cpu"}


def _recipe(model: dict | None = None, **train_changes):
    return recipe_from_dict({**TINY, "model": model or TINY_EXAMPLE, "train": {**FAST, **train_changes}})


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> RunDir:
    """300 of the bundled digits (195 to train on), prepared once for this module."""
    rd = RunDir(tmp_path_factory.mktemp("digits")).ensure()
    prepare.run(prepare.Config(dataset="digits", max_samples=300), rd, NullTracker())
    return rd


def _copy(src: RunDir, dst: Path) -> RunDir:
    rd = RunDir(dst).ensure()
    for path in (src.data, src.dataset):
        (rd.root / path.name).write_bytes(path.read_bytes())
    return rd


@pytest.fixture
def custom_yaml(tmp_path) -> Path:
    """The tiny recipe with the example factory (tiny widths), as a file for the CLI."""
    import yaml

    path = tmp_path / "custom.yaml"
    path.write_text(yaml.safe_dump({**TINY, "model": TINY_EXAMPLE, "train": FAST}))
    return path


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    """A package of the user's own, importable (like a directory they run in): its `net.build` factory
    imports `blocks` from its own package. Returns (package name, its directory)."""
    name = f"usernet_{uuid.uuid4().hex[:8]}"
    root = tmp_path / "src" / name
    root.mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "blocks.py").write_text("from torch import nn\n\nACT = nn.ReLU\n")
    (root / "net.py").write_text(textwrap.dedent("""
        from torch import nn

        from .blocks import ACT


        def build(in_features: int, num_classes: int, hidden: int = 8):
            return nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), ACT(), nn.Linear(hidden, num_classes))


        def wrong_width(in_features: int, hidden: int = 8):
            return nn.Sequential(nn.Flatten(), nn.Linear(in_features, 7))


        def wrong_input(num_classes: int):
            return nn.Sequential(nn.Flatten(), nn.Linear(5, num_classes))


        def not_a_module(num_classes: int):
            return "a model"


        def needs_depth(num_classes: int, depth: int):
            return nn.Linear(64, num_classes)
    """))
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    yield name, root
    for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[module]


# ---------------------------------------------------------------- your own model

def test_a_custom_factory_trains_exports_through_the_parity_gate_and_rebuilds_alone(digits, tmp_path, user_package):
    from pipeline.orchestrate import run_stage

    name, _ = user_package
    recipe = _recipe({"family": "custom", "factory": f"{name}.net:build", "kwargs": {"hidden": 16}})
    rd = _copy(digits, tmp_path / "run")
    outcome = run_stage("train", recipe, rd, track=False)
    assert outcome.status == "done" and "val_acc" in outcome.summary
    meta = checkpoint.read(rd.checkpoint)
    assert meta["model"]["family"] == "custom" and meta["model"]["task"] == "classification"
    assert meta["model"]["config"] == {"factory": f"{name}.net:build", "kwargs": {"hidden": 16}}

    # The checkpoint rebuilds its model alone: the factory (with its recorded kwargs) is imported again.
    model, _ = checkpoint.load(rd.checkpoint)
    assert [m.out_features for m in model if isinstance(m, torch.nn.Linear)] == [16, 10]

    result = export.run(export.Config(exporter="legacy", check_batch_sizes=(1, 37)), rd, NullTracker())
    assert result.max_abs_diff < 1e-4  # ONNX Runtime reproduces PyTorch on real test inputs at batch 1 and 37
    from stages.onnx_model import OnnxModel

    onnx_model = OnnxModel.open(rd.onnx)
    assert (onnx_model.meta.family, onnx_model.meta.task, len(onnx_model.meta.labels)) == ("custom", "classification", 10)


def test_editing_the_factory_or_a_module_it_imports_reruns_train(digits, tmp_path, user_package):
    from pipeline.orchestrate import plan, run_stage

    name, root = user_package
    recipe = _recipe({"family": "custom", "factory": f"{name}.net:build"})
    rd = _copy(digits, tmp_path / "run")
    run_stage("train", recipe, rd, track=False)

    def train_decision():
        return next(d for d in plan(recipe, rd, stages=("train",), track=False))

    assert not train_decision().run  # nothing changed: reused
    (root / "net.py").write_text((root / "net.py").read_text() + "\n# a comment is an edit too\n")
    decision = train_decision()
    assert decision.run and any(r.endswith(f"{name}/net.py changed") for r in decision.reasons), decision.reasons
    (root / "blocks.py").write_text("from torch import nn\n\nACT = nn.GELU\n")
    assert any(f"{name}/blocks.py changed" in r for r in train_decision().reasons)


def test_a_factory_from_an_installed_library_counts_by_its_version():
    from pipeline import fingerprint

    assert fingerprint.user_code_components(["torch.nn"]) == {"lib:torch": torch.__version__}


@pytest.mark.parametrize("factory, kwargs, error", [
    ("no_such_package_xyz.net:build", {}, r"module `no_such_package_xyz.net` does not import \(No module named"),
    ("{pkg}.net:missing", {}, r"`{pkg}.net` has no `missing`; its functions: build, needs_depth, not_a_module"),
    ("{pkg}.net:not_a_module", {}, r"returned str, not a torch.nn.Module"),
    ("{pkg}.net:wrong_width", {}, r"on a batch of 8 real samples the model returns shape \(8, 7\), but this "
                                  r"classification dataset needs \(8, 10\) \(10 classes\)"),
    ("{pkg}.net:wrong_input", {}, r"the model fails on a batch of 8 real samples of shape \(8, 1, 8, 8\) "
                                  r"\(RuntimeError: mat1 and mat2 shapes cannot be multiplied"),
    ("{pkg}.net:needs_depth", {}, r"cannot be called with \['num_classes'\] .*: add depth under model.kwargs"),
    ("{pkg}.net:build", {"hidden": 4, "width": 3}, r"cannot be called with .*got an unexpected keyword argument 'width'"),
])
def test_each_bad_factory_is_one_error_naming_it(digits, tmp_path, user_package, factory, kwargs, error):
    pkg, _ = user_package
    factory = factory.format(pkg=pkg)
    recipe = _recipe({"family": "custom", "factory": factory, "kwargs": kwargs})
    with pytest.raises(InputError, match=rf"^model.factory `{factory}`: " + error.format(pkg=pkg)):
        train.run(recipe.train, _copy(digits, tmp_path / "run"), NullTracker(), family="custom",
                  model_config=recipe.model.config)


@pytest.mark.parametrize("model, error", [
    ({"factory": "examples.custom_model.resnet.build"}, "`model.factory` must be `package.module:function`"),
    ({"factory": "examples.custom_model.resnet:build", "kwargs": {"num_classes": 3}},
     "`model.kwargs` must not set num_classes: the pipeline passes it from the dataset"),
    ({"factory": "x:y", "kwargs": [1]}, "`model.kwargs` must be a mapping"),
    ({"factory": "x:y", "width": 3}, "unknown key `model.width`; valid keys in `model`: factory, kwargs"),
])
def test_a_malformed_model_section_is_a_recipe_error(model, error):
    with pytest.raises(ConfigError, match=error):
        _recipe({"family": "custom", **model})


def test_the_cli_exits_2_with_one_line_for_a_factory_that_does_not_fit(digits, tmp_path, custom_yaml, user_package):
    from tests.test_cli import invoke

    pkg, _ = user_package
    rd = _copy(digits, tmp_path / "run")
    result = invoke("train", "-r", str(custom_yaml), "-w", str(rd.root), "--no-track", "--set",
                    f"model.factory={pkg}.net:wrong_width", "--set", "model.kwargs={}", code=2)
    assert "Traceback" not in result.stderr
    assert f"error: model.factory `{pkg}.net:wrong_width`: on a batch of 8 real samples" in result.stderr


def _torchvision_import_error() -> str:
    try:
        import torchvision  # noqa: F401
    except Exception as e:  # beside a torch it was not built for, torchvision raises RuntimeError on import
        return f"{type(e).__name__}: {e}"
    return ""


@pytest.mark.skipif(not _torchvision_import_error(), reason="torchvision imports here: the test below builds with it")
def test_by_name_without_the_library_says_what_to_install(digits, tmp_path):
    recipe = _recipe({"family": "torchvision", "arch": "resnet18"})
    with pytest.raises(InputError, match=r"model.family torchvision \(arch `resnet18`\) needs the torchvision package, "
                                         r"which does not import here .*install the torchvision release built for torch "
                                         + torch.__version__.split("+")[0]):
        train.run(recipe.train, _copy(digits, tmp_path / "run"), NullTracker(), family="torchvision",
                  model_config=recipe.model.config)


@pytest.mark.skipif(bool(_torchvision_import_error()),
                    reason=f"torchvision does not import beside torch {torch.__version__} here "
                           f"({_torchvision_import_error()[:120]}); install the matching release to run it")
def test_a_torchvision_resnet_by_name_takes_the_datasets_channels_and_classes():
    model = models.build("torchvision", models.custom.ArchConfig(arch="resnet18"), (1, 8, 8), 5)
    assert model.conv1.in_channels == 1 and model.fc.out_features == 5 and models.output_layer(model) == "fc"
    assert model.eval()(torch.randn(2, 1, 8, 8)).shape == (2, 5)


# ---------------------------------------------------------------- pretrained weights

def _example_model(classes: int = 10):
    torch.manual_seed(1)
    return models.build("custom", models.custom.Config(factory=EXAMPLE, kwargs=TINY_EXAMPLE["kwargs"]), (1, 8, 8),
                        classes, "classification")


def test_a_weights_file_loads_with_a_report_of_loaded_skipped_missing_unexpected(tmp_path):
    source = _example_model().state_dict()
    source["stem.0.weight"] = torch.randn(5, 1, 3, 3)  # another shape: skipped
    del source["blocks.0.body.1.bias"]  # missing
    source["extra.weight"] = torch.ones(2)  # unexpected
    path = tmp_path / "weights.pt"
    torch.save({"model": {f"module.{k}": v for k, v in source.items()}, "epoch": 3}, path)  # a DDP-saved dict

    model = _example_model(classes=3)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    report = checkpoint.load_weights(model, path, head="classifier", strict=False)
    assert (report.format, report.stripped_prefix) == ("state_dict (under `model`)", "module.")
    assert report.skipped == [{"name": "stem.0.weight", "file_shape": [5, 1, 3, 3], "model_shape": [4, 1, 3, 3]}]
    assert (report.missing, report.unexpected) == (["blocks.0.body.1.bias"], ["extra.weight"])
    assert report.new_head == ["classifier.weight", "classifier.bias"] and "output size differs" in report.new_head_reason
    state = model.state_dict()
    assert all(torch.equal(state[k], source[k]) for k in report.loaded) and len(report.loaded) == len(state) - 4
    assert all(torch.equal(state[k], fresh[k]) for k in ["stem.0.weight", "blocks.0.body.1.bias", *report.new_head])

    with pytest.raises(StageError, match=r"cannot start strictly from .*weights.pt: 3 tensors do not load beyond the "
                                         r"head `classifier`: skipped \(shape mismatch\): `stem.0.weight` \(5, 1, 3, 3\) in "
                                         r"the file, \(4, 1, 3, 3\) here; missing from the file .*: blocks.0.body.1.bias; "
                                         r"in the file but not in this model \(ignored\): extra.weight; .*strict=false"):
        checkpoint.load_weights(_example_model(classes=3), path, head="classifier", strict=True)


def test_a_checkpoint_with_another_label_set_gets_a_new_head_even_at_the_same_width(tmp_path):
    checkpoint.save(tmp_path / "ckpt.pt", _example_model(classes=5), {"label_names": list("01234")})
    report = checkpoint.load_weights(_example_model(classes=5), tmp_path / "ckpt.pt", head="classifier",
                                     labels=list("56789"))
    assert report.new_head == ["classifier.weight", "classifier.bias"] and not report.skipped
    assert report.new_head_reason == "label set differs: ['0', '1', '2', '3', '4'] in the file, ['5', '6', '7', '8', '9'] here"
    with pytest.raises(StageError, match="holds no state dict of tensors"):
        torch.save({"epoch": 1}, tmp_path / "empty.pt")
        checkpoint.load_weights(_example_model(), tmp_path / "empty.pt", head="classifier")


def test_fine_tuning_from_safetensors_records_the_report_in_the_run_directory_and_mlflow(digits, tmp_path):
    import mlflow
    from safetensors.torch import save_file

    from pipeline.orchestrate import run_stage

    path = tmp_path / "pretrained.safetensors"
    save_file({k: v.contiguous() for k, v in _example_model().state_dict().items()}, str(path))
    recipe = _recipe(finetune={"weights": str(path), "strict": True})
    rd = _copy(digits, tmp_path / "run")
    outcome = run_stage("train", recipe, rd, track=True)

    report = json.loads(rd.weights_report.read_text())
    assert report["format"] == "safetensors" and report["head"] == "classifier"
    assert report["counts"] == {"loaded": len(report["loaded"]), "skipped": 0, "missing": 0, "unexpected": 0, "new_head": 0}
    run = mlflow.get_run(outcome.run_id)
    assert run.data.params["weights.loaded"] == str(len(report["loaded"])) and run.data.params["weights.skipped"] == "0"
    assert "weights_report.json" in {a.path for a in mlflow.MlflowClient().list_artifacts(outcome.run_id)}
    assert checkpoint.read(rd.checkpoint)["init_from"] == str(path)


def test_strict_fine_tuning_refuses_weights_of_another_architecture_and_the_cli_exits_2(digits, tmp_path, custom_yaml):
    from tests.test_cli import invoke

    other = models.build("custom", models.custom.Config(factory=EXAMPLE, kwargs={"width": 6, "blocks": 1}), (1, 8, 8),
                         10, "classification")
    path = tmp_path / "other.pth"
    torch.save(other.state_dict(), path)
    rd = _copy(digits, tmp_path / "run")
    result = invoke("train", "-r", str(custom_yaml), "-w", str(rd.root), "--no-track", "--init-from", str(path), code=2)
    assert "error: cannot start strictly from" in result.stderr and "skipped (shape mismatch): `stem.0.weight` (6, 1, 3, 3)" \
        in result.stderr and "Traceback" not in result.stderr


def test_the_frozen_backbone_does_not_change_then_learns_at_its_scaled_rate(digits, tmp_path, caplog):
    source = _example_model().state_dict()
    path = tmp_path / "pretrained.pt"
    torch.save(source, path)
    recipe = _recipe(finetune={"weights": str(path), "freeze_epochs": 1, "backbone_lr_scale": 0.1}, epochs=2,
                     lr=0.02, schedule="constant")

    # One epoch, all of it frozen: the backbone's weights and normalization statistics are the file's.
    frozen = dataclasses.replace(recipe.train, epochs=1)
    rd = _copy(digits, tmp_path / "frozen")
    train.run(frozen, rd, NullTracker(), family="custom", model_config=recipe.model.config,
              init_from=path)
    state = checkpoint.load_state(rd.train_state)
    after = state["model"]
    backbone = [k for k in source if not k.startswith("classifier.")]
    assert all(torch.equal(after[k], source[k]) for k in backbone)
    assert not torch.equal(after["classifier.weight"], source["classifier.weight"])  # the head learned
    groups = {g["name"]: g for g in state["optimizer"]["param_groups"]}
    head_ids = set(groups["head"]["params"])
    assert set(state["optimizer"]["state"]) == head_ids  # no optimizer state (no step) for the frozen backbone

    # Two epochs: the second thaws the backbone, which then learns at 0.1 x the head's rate.
    rd = _copy(digits, tmp_path / "thawed")
    with caplog.at_level(logging.INFO, logger="stages.train"):
        train.run(recipe.train, rd, NullTracker(), family="custom", model_config=recipe.model.config, init_from=path)
    assert "freezing the backbone" in caplog.text and "unfreezing the backbone" in caplog.text
    state = checkpoint.load_state(rd.train_state)
    assert not torch.equal(state["model"]["stem.0.weight"], source["stem.0.weight"])
    groups = {g["name"]: g for g in state["optimizer"]["param_groups"]}
    assert groups["head"]["lr"] == pytest.approx(0.02) and groups["backbone"]["lr"] == pytest.approx(0.002)
    assert (groups["backbone"]["lr_scale"], groups["head"]["lr_scale"]) == (0.1, 1.0)


def test_parameter_groups_split_the_head_from_the_backbone():
    model = _example_model()
    groups = optim.param_groups(model, "classifier", 0.25)
    assert [(g["name"], g["lr_scale"], len(g["params"])) for g in groups] == [
        ("backbone", 0.25, len(list(model.parameters())) - 2), ("head", 1.0, 2)]
    opt = optim.build_optimizer("sgd", groups, train.Config(optimizer="sgd", lr=1.0, momentum=0.0, weight_decay=0.0))
    for group in opt.param_groups:
        group["lr"] = 1.0 * group["lr_scale"]  # what the loop does each step
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.randn(4, 1, 8, 8)).sum().backward()
    opt.step()
    for n, p in model.named_parameters():  # plain SGD: the step is lr x grad, per group
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        scale = 1.0 if n.startswith("classifier.") else 0.25
        torch.testing.assert_close(before[n] - p.detach(), scale * grad)
    assert optim.param_groups(model)[0]["name"] == "all"


def test_fine_tuning_settings_are_checked(digits, tmp_path):
    with pytest.raises(ConfigError, match=r"`train.finetune.backbone_lr_scale` must be in \(0, 1\]"):
        _recipe(finetune={"backbone_lr_scale": 0})
    with pytest.raises(ConfigError, match="`train.finetune.freeze_epochs` must be at most epochs"):
        _recipe(finetune={"freeze_epochs": 3}, epochs=2)
    recipe = _recipe(finetune={"freeze_epochs": 1})
    with pytest.raises(InputError, match="freezes a pretrained backbone, but no weights are given"):
        train.run(recipe.train, _copy(digits, tmp_path / "a"), NullTracker(), family="custom",
                  model_config=recipe.model.config)
    recipe = _recipe(finetune={"head": "nope", "backbone_lr_scale": 0.5})
    with pytest.raises(InputError, match="train.finetune.head `nope` is not a module with parameters in this model "
                                         r"\(its top-level modules: stem, blocks, pool, classifier\)"):
        train.run(recipe.train, _copy(digits, tmp_path / "b"), NullTracker(), family="custom",
                  model_config=recipe.model.config)


def test_init_from_and_recipe_weights_together_are_refused(tmp_path):
    from pipeline.orchestrate import Context, _train

    recipe = _recipe(finetune={"weights": "a.pt"})
    with pytest.raises(InputError, match="--init-from b.pt and train.finetune.weights a.pt both name weights"):
        _train(Context(recipe, RunDir(tmp_path), init_from="b.pt"), NullTracker())


# ---------------------------------------------------------------- data for transfer learning

def test_prepare_keeps_chosen_classes_and_few_training_samples_per_class(tmp_path):
    rd = RunDir(tmp_path).ensure()
    result = prepare.run(prepare.Config(classes=(5, 6, 7, 8, 9), samples_per_class=20), rd, NullTracker())
    info = json.loads(rd.dataset.read_text())
    assert info["label_names"] == ["5", "6", "7", "8", "9"] and result.num_classes == 5
    assert info["class_counts"]["train"] == [20] * 5 and sum(info["class_counts"]["test"]) > 150
    with np.load(rd.data) as f:
        assert set(np.unique(f["y_test"])) == set(range(5))
    with pytest.raises(StageError, match=r"prepare.classes names \['ten'\], which digits does not have"):
        prepare.run(prepare.Config(classes=(5, "ten")), rd, NullTracker())
