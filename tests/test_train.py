"""The train stage in depth: optimizers and schedules from their tables, early stopping, resuming a
killed run, fine-tuning onto a different label count, distillation, prune's fine-tune on the same loss,
and two-process DDP on CPU."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import models
from stages.contract import RunDir
from stages.contract import NullTracker
from stages import checkpoint, optim, train
from stages.common import StageError, write_json

ROOT = Path(__file__).resolve().parents[1]


def _data_copy(prepared: RunDir, dst: Path) -> RunDir:
    """A fresh run directory holding only prepare's output (data.npz, dataset.json)."""
    rd = RunDir(dst).ensure()
    shutil.copy(prepared.data, rd.data)
    shutil.copy(prepared.dataset, rd.dataset)
    return rd


@pytest.fixture(scope="module")
def small(tiny_recipe, tmp_path_factory) -> RunDir:
    """The tiny recipe's digits cut to 400 samples (260 to train on): a few steps per epoch."""
    from pipeline.orchestrate import run_stage

    recipe = dataclasses.replace(tiny_recipe, prepare=dataclasses.replace(tiny_recipe.prepare, max_samples=400))
    rd = RunDir(tmp_path_factory.mktemp("small")).ensure()
    run_stage("prepare", recipe, rd, track=False)
    return rd


def _train(recipe, rd: RunDir, *, resume=False, init_from=None, teacher=None, family=None, model_config=None,
           **changes):
    """train.run on the tiny recipe with some train settings changed."""
    return train.run(dataclasses.replace(recipe.train, **changes), rd, NullTracker(), family=family or recipe.model.family,
                     model_config=model_config or recipe.model.config, resume=resume, init_from=init_from,
                     teacher=teacher)


# ---------------------------------------------------------------- optimizers and schedules

@pytest.mark.parametrize("name", sorted(optim.OPTIMIZERS))
def test_every_optimizer_constructs_and_steps(name):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    cfg = train.Config(optimizer=name, nesterov=name == "sgd", lr=0.1)
    opt = optim.build_optimizer(name, model.parameters(), cfg)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name", sorted(optim.SCHEDULES))
def test_every_schedule_stays_in_range_and_has_its_shape(name):
    cfg = train.Config(schedule=name, epochs=20, warmup_epochs=2, lr=1.0, step_epochs=5, gamma=0.5)
    lrs = [optim.lr_at(cfg, e / 10) for e in range(200)]
    assert all(0 < lr <= 1.0 + 1e-9 for lr in lrs)
    if name == "one-cycle":
        assert lrs[0] == pytest.approx(1 / 25, rel=1e-3) and max(lrs) == pytest.approx(1.0, rel=1e-3)
        assert lrs.index(max(lrs)) == pytest.approx(0.3 * 200, abs=2) and lrs[-1] < 1e-3
        return
    assert lrs[0] < lrs[10] < lrs[20] == pytest.approx(1.0)  # linear warm-up over 2 epochs
    if name == "cosine":
        assert lrs[-1] < 0.01
    elif name == "step":
        assert optim.lr_at(cfg, 8) == pytest.approx(0.5) and optim.lr_at(cfg, 13) == pytest.approx(0.25)
    else:  # constant, plateau (without a plateau reached)
        assert lrs[-1] == pytest.approx(1.0)


def test_plateau_cuts_the_rate_after_patience_epochs_without_improvement():
    cfg = train.Config(schedule="plateau", warmup_epochs=0, lr=1.0, gamma=0.5, plateau_patience=1)
    plateau = optim.Plateau(cfg.gamma, cfg.plateau_patience, "max")
    for acc in (0.5, 0.6, 0.6, 0.6):  # better, then two epochs without improvement
        plateau.update(acc)
    assert optim.lr_at(cfg, 4, plateau) == pytest.approx(0.5)
    restored = optim.Plateau(0.5, 1, "max")
    restored.load_state_dict(plateau.state_dict())
    assert restored == plateau


@pytest.mark.parametrize("key, value, message", [
    ("nesterov", True, "`nesterov` needs optimizer sgd"),
    ("grad_clip", -1.0, "`grad_clip` must be >= 0"),
    ("betas", (0.9,), "`betas` must be two numbers"),
    ("checkpoint_every", 0, "`checkpoint_every` must be >= 1"),
])
def test_bad_train_settings_name_the_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        train.Config(**{key: value})


def test_recipe_reaches_nested_train_sections():
    from pipeline.config import ConfigError, recipe_from_dict

    from tests.conftest import TINY

    recipe = recipe_from_dict({**TINY, "train": {**TINY["train"], "early_stopping": {"patience": 3},
                                                  "distill": {"teacher": "digits-cnn", "alpha": 0.5}}})
    assert recipe.train.early_stopping.patience == 3 and recipe.train.distill.alpha == 0.5
    with pytest.raises(ConfigError, match=r"`train.distill.alpha` must be in \[0, 1\]"):
        recipe_from_dict({**TINY, "train": {"distill": {"alpha": 2}}})
    with pytest.raises(ConfigError, match="unknown key `train.early_stopping.patient`"):
        recipe_from_dict({**TINY, "train": {"early_stopping": {"patient": 2}}})


# ---------------------------------------------------------------- the loop

def test_early_stopping_stops_when_the_metric_stalls(tiny_recipe, small, tmp_path):
    rd = _data_copy(small, tmp_path / "run")
    # No epoch can raise validation accuracy by a whole point (1.0): the first epoch sets the mark,
    # the next two fail it, and with patience 2 the run stops at epoch 3 of 10.
    result = _train(tiny_recipe, rd, epochs=10, early_stopping=train.EarlyStopping(patience=2, min_delta=1.0))
    assert result.stopped_early and result.epochs_run == 3
    assert len(json.loads(rd.history.read_text())) == 3
    assert "stopped early at 3" in result.summary()


@pytest.mark.parametrize("keep", ["best", "last"])
def test_keep_chooses_the_checkpoints_epoch_and_last_holds_the_final_weights(tiny_recipe, small, tmp_path, keep):
    rd = _data_copy(small, tmp_path / "run")
    # Early stopping ends the run at epoch 3 of 10 (no epoch can gain a whole point): `last` keeps that epoch.
    result = _train(tiny_recipe, rd, epochs=10, keep=keep, early_stopping=train.EarlyStopping(patience=2, min_delta=1.0))
    history = json.loads(rd.history.read_text())
    assert len(history) == 3
    best = max(history, key=lambda h: (h["val_accuracy"], -h["val_loss"]))
    kept = history[-1] if keep == "last" else best
    meta = json.loads(rd.checkpoint_json.read_text())
    assert meta["epoch"] == result.best_epoch == kept["epoch"]
    assert result.value == meta["val_accuracy"] == kept["val_accuracy"] and result.val_loss == kept["val_loss"]
    saved = checkpoint.read(rd.checkpoint)["state_dict"]
    final = checkpoint.load_state(rd.train_state)["model"]
    same = all(torch.equal(saved[k], final[k]) for k in final)
    assert same == (kept["epoch"] == 3)  # the checkpoint holds the final weights only when it kept the final epoch


def test_a_keep_other_than_best_or_last_is_refused_by_name():
    from pipeline.config import ConfigError, recipe_from_dict

    from tests.conftest import TINY

    with pytest.raises(ConfigError, match="`train.keep` must be one of best, last; got 'final'"):
        recipe_from_dict({**TINY, "train": {"keep": "final"}})


def test_early_stopping_on_an_unknown_metric_is_one_clear_error(tiny_recipe, small, tmp_path):
    rd = _data_copy(small, tmp_path / "run")
    with pytest.raises(StageError, match="`val_r2` is not a validation metric of this classification run"):
        _train(tiny_recipe, rd, epochs=2, early_stopping=train.EarlyStopping(metric="val_r2"))


def test_sgd_step_schedule_clipping_smoothing_augmentation_bf16_and_channels_last_train(tiny_recipe, small, tmp_path):
    rd = _data_copy(small, tmp_path / "run")
    result = _train(tiny_recipe, rd, epochs=3, optimizer="sgd", lr=0.1, nesterov=True, schedule="step",
                    step_epochs=1, gamma=0.5, grad_clip=1.0, label_smoothing=0.1, augment_shift=1,
                    precision="bf16", channels_last="on")
    assert result.precision == "bf16"
    history = json.loads(rd.history.read_text())
    assert [round(h["lr"], 6) for h in history] == [0.1, 0.05, 0.025]  # the rate at each epoch's last step
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_the_dataloader_path_trains_like_the_resident_one(tiny_recipe, small, tmp_path):
    resident = _train(tiny_recipe, _data_copy(small, tmp_path / "a"), epochs=2, data_path="device")
    loader = _train(tiny_recipe, _data_copy(small, tmp_path / "b"), epochs=2, data_path="loader",
                    loader_workers=0)
    assert (resident.data_path, loader.data_path) == ("device", "loader")
    # Same seed, same permutation, same batches, same dropout masks: the same numbers.
    assert json.loads((tmp_path / "a" / "history.json").read_text()) == json.loads((tmp_path / "b" / "history.json").read_text())


@pytest.mark.parametrize("wrap", [False, True])
def test_random_shifts_move_signals_and_images_by_at_most_k(wrap):
    gen = torch.Generator().manual_seed(0)
    signals = torch.arange(64 * 2 * 12, dtype=torch.float32).reshape(64, 2, 12)
    shifted = train._random_shift(signals, 3, gen, wrap)
    seen = set()
    for x, y in zip(signals, shifted):  # each signal, both channels alike, is one shift of d in [-3, 3]
        matches = [d for d in range(-3, 4) if torch.equal(y, torch.roll(x, -d, dims=-1) if wrap else
                                                          x[:, (torch.arange(12) + d).clamp(0, 11)])]
        assert matches, f"{y} is no shift of {x} by at most 3"
        seen.add(matches[0])
    assert len(seen) > 3  # the shifts vary from signal to signal
    images = torch.arange(16 * 1 * 5 * 5, dtype=torch.float32).reshape(16, 1, 5, 5)
    moved = train._random_shift(images, 1, gen, wrap)
    for x, y in zip(images, moved):
        assert any(torch.equal(y, torch.roll(x, (-dy, -dx), dims=(-2, -1)) if wrap else
                               x[:, (torch.arange(5) + dy).clamp(0, 4)][:, :, (torch.arange(5) + dx).clamp(0, 4)])
                   for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def _signal_copy(prepared: RunDir, dst: Path) -> RunDir:
    """The digits as 1-D signals (N, 1, 64): each image's rows one after another."""
    rd = RunDir(dst).ensure()
    with np.load(prepared.data) as f:
        arrays = {k: (f[k].reshape(len(f[k]), 1, -1) if k.startswith("x_") else f[k]) for k in f.files}
    np.savez(rd.data, **arrays)
    info = json.loads(prepared.dataset.read_text())
    info.update(sha256="2" * 64)
    write_json(rd.dataset, info)
    return rd


def test_signals_train_with_shifts_and_a_shift_as_long_as_the_input_is_one_clear_error(tiny_recipe, small, tmp_path):
    rd = _signal_copy(small, tmp_path / "run")
    mlp = models.FAMILIES["mlp"].config_class()
    _train(tiny_recipe, rd, epochs=2, family="mlp", model_config=mlp, augment_shift=3, augment_wrap=True)
    history = json.loads(rd.history.read_text())
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    with pytest.raises(StageError, match=r"train.augment_shift \(8\) must be smaller than the inputs' \(8, 8\)"):
        _train(tiny_recipe, _data_copy(small, tmp_path / "images"), epochs=2, augment_shift=8)


def _regression_copy(prepared: RunDir, dst: Path) -> RunDir:
    """The digits as a regression problem: predict the digit's value (float, one target) from its image."""
    rd = RunDir(dst).ensure()
    with np.load(prepared.data) as f:
        arrays = {k: (f[k].astype(np.float32)[:, None] if k.startswith("y_") else f[k]) for k in f.files}
    np.savez(rd.data, **arrays)
    info = json.loads(prepared.dataset.read_text())
    for key in ("num_classes", "label_names"):
        info.pop(key, None)
    info.update(task="regression", target_names=["digit"], sha256="1" * 64)
    write_json(rd.dataset, info)
    return rd


@pytest.mark.parametrize("task, family", [("regression", "mlp"), ("vae", "vae")])
def test_the_loop_trains_every_task(tiny_recipe, small, tmp_path, task, family):
    rd = _regression_copy(small, tmp_path / "run") if task == "regression" else _data_copy(small, tmp_path / "run")
    cfg = models.FAMILIES[family].config_class()
    result = _train(tiny_recipe, rd, epochs=3, lr=3e-3, family=family, model_config=cfg, early_stopping=train.EarlyStopping(
        patience=5, metric="val_loss"))
    history = json.loads(rd.history.read_text())
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    primary = {"regression": "val_r2", "vae": "val_reconstruction_mse"}[task]
    assert result.metric == primary and all(primary in h for h in history)
    meta = checkpoint.read(rd.checkpoint)
    assert meta["task"] == task
    if task == "vae":  # the ELBO's two terms are logged apart
        assert {"train_reconstruction", "train_kl"} <= set(history[0])
        assert result.value == min(h[primary] for h in history)  # lower is better
    else:
        assert meta["target_names"] == ["digit"] and result.value == max(h[primary] for h in history)


# ---------------------------------------------------------------- resume

def test_resume_after_sigkill_equals_an_uninterrupted_run(tiny_recipe, tiny_yaml, small, tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.config import load_recipe
    from pipeline.orchestrate import run_stage

    name = f"resume-{tmp_path.name[-12:].strip('_')}"  # an experiment of its own in the session's store
    epochs, overrides = 10, ["train.epochs=10", "train.schedule=plateau", "train.plateau_patience=1",
                             "train.augment_shift=1", f"name={name}"]
    killed = _data_copy(small, tmp_path / "killed")
    cmd = [sys.executable, "-m", "pipeline.cli", "train", "--recipe", str(tiny_yaml), "--workdir", str(killed.root),
           *[a for o in overrides for a in ("--set", o)]]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not killed.train_state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {err.decode()[-2000:]}"
    state = torch.load(killed.train_state, weights_only=True)
    stopped_at, killed_run = state["epoch"], state["run_id"]
    assert 1 <= stopped_at < epochs and killed_run

    recipe = load_recipe(tiny_yaml, overrides)
    run_stage("train", recipe, killed, track=True, resume=True)  # what `pipeline train --resume` does
    resumed = json.loads(killed.result("train").read_text())["result"]
    whole = _data_copy(small, tmp_path / "whole")
    uninterrupted = train.run(recipe.train, whole, NullTracker(), family="cnn", model_config=recipe.model.config)

    assert resumed["resumed_from_epoch"] == stopped_at
    assert json.loads(killed.history.read_text()) == json.loads(whole.history.read_text())  # bit-exact on CPU
    assert (resumed["best_epoch"], resumed["value"], resumed["val_loss"]) == (
        uninterrupted.best_epoch, uninterrupted.value, uninterrupted.val_loss)
    a, b = checkpoint.read(killed.checkpoint)["state_dict"], checkpoint.read(whole.checkpoint)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    # The resumed run is a new MLflow run that names the run it continues and carries the whole curve.
    new_run = MlflowClient().get_run(resumed["run_id"])
    assert new_run.info.run_id != killed_run and new_run.data.tags["train.resumed_from_run"] == killed_run
    assert len(MlflowClient().get_metric_history(new_run.info.run_id, "val_accuracy")) == epochs

    # A changed recipe cannot resume that state, and the error says what changed.
    changed = dataclasses.replace(recipe.train, lr=0.5)
    with pytest.raises(StageError, match=r"train.lr \(0.01 -> 0.5\)"):
        train.run(changed, killed, NullTracker(), resume=True, family="cnn", model_config=recipe.model.config)


def test_resume_without_a_state_says_how_to_start(tiny_recipe, small, tmp_path):
    with pytest.raises(StageError, match="no resumable training state .* train again without --resume"):
        _train(tiny_recipe, _data_copy(small, tmp_path / "run"), resume=True)


# ---------------------------------------------------------------- fine-tuning and distillation

def _three_class_copy(prepared: RunDir, dst: Path) -> RunDir:
    """The tiny digits split cut down to the labels 0, 1 and 2: a dataset with another label count."""
    rd = RunDir(dst).ensure()
    with np.load(prepared.data) as f:
        arrays = {k: f[k] for k in f.files}
    for s in ("train", "val", "test"):
        keep = arrays[f"y_{s}"] < 3
        arrays[f"x_{s}"], arrays[f"y_{s}"] = arrays[f"x_{s}"][keep], arrays[f"y_{s}"][keep]
    np.savez(rd.data, **arrays)
    info = json.loads(prepared.dataset.read_text())
    info.update(num_classes=3, label_names=info["label_names"][:3], sha256="0" * 64)
    write_json(rd.dataset, info)
    return rd


def test_init_from_a_ten_class_run_replaces_the_head_for_three_classes(tiny_recipe, trained, tmp_path):
    source = checkpoint.read(trained.checkpoint)["state_dict"]
    model = models.build("cnn", tiny_recipe.model.config, (1, 8, 8), 3)
    head = models.output_layer(model)
    assert head == "head.5"
    report = checkpoint.load_weights(model, trained.checkpoint, head=head)
    state = model.state_dict()
    assert all(torch.equal(state[k], source[k]) for k in state if not k.startswith(head + "."))
    assert state[f"{head}.weight"].shape == (3, 32) and report.new_head == ["head.5.weight", "head.5.bias"]
    assert "output size differs: (10, 32) in the file, (3, 32) here" in report.new_head_reason

    rd = _three_class_copy(trained, tmp_path / "three")
    tuned = _train(tiny_recipe, rd, epochs=2, init_from=trained.checkpoint)
    meta = checkpoint.read(rd.checkpoint)
    assert meta["init_from"] == str(trained.checkpoint) and meta["model"]["num_classes"] == 3
    assert tuned.value > 0.9  # pre-trained features on the same images: three classes are easy


def test_init_from_another_architecture_lists_every_mismatch(trained):
    other = models.build("cnn", models.FAMILIES["cnn"].config_class(channels=(4, 16), pool_after=1, hidden=32),
                         (1, 8, 8), 10)
    with pytest.raises(StageError, match=r"\d+ tensors do not load beyond the head `head.5`: skipped \(shape "
                                         r"mismatch\): `features.0.weight` \(8, 1, 3, 3\) in the file, \(4, 1, 3, 3\) here"):
        checkpoint.load_weights(other, trained.checkpoint, head="head.5")


def test_distillation_loss_is_hintons():
    cfg = train.Config(distill=train.Distill(teacher="x", temperature=3.0, alpha=0.75))
    torch.manual_seed(0)
    student, teacher, y = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    idx = torch.arange(8)
    loss, parts = train._loss_fn(cfg, "classification", teacher, None, None)(student, y, idx, None)
    soft = (torch.softmax(teacher / 3, 1) * (torch.log_softmax(teacher / 3, 1) - torch.log_softmax(student / 3, 1))).sum(1).mean()
    hard = torch.nn.functional.cross_entropy(student, y)
    assert loss.item() == pytest.approx((0.75 * 9 * soft + 0.25 * hard).item(), rel=1e-5)
    pure = dataclasses.replace(cfg, distill=train.Distill(teacher="x", alpha=1.0))
    assert train._loss_fn(pure, "classification", teacher, None, None)(teacher, y, idx, None)[0].item() == pytest.approx(0, abs=1e-6)
    assert parts["hard"].item() == pytest.approx(hard.item())


def test_prunes_fine_tune_trains_on_the_train_stages_loss():
    from stages.losses import compute_loss
    from stages.quantize import prune

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    x = np.random.default_rng(0).normal(size=(100, 1, 4, 4)).astype(np.float32)
    y = x.reshape(100, 16)[:, :2].copy()  # (N, T) regression targets
    with torch.no_grad():
        before = compute_loss("regression", model(torch.from_numpy(x)), torch.from_numpy(y))[0].item()
    losses = prune.fine_tune(model, x, y, "regression", epochs=1, lr=0.0)  # lr 0: the loss of the model as it is
    assert losses == [pytest.approx(before, rel=1e-5)]
    # compute_loss's own check, not a silent reshape: (N,) targets for a (N, 1) output are refused.
    with pytest.raises(ValueError, match=r"targets must be \(N, T\) float"):
        prune.fine_tune(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 1)), x, y[:, 0], "regression",
                        epochs=1, lr=0.0)


def test_distillation_trains_a_smaller_student_against_the_teacher(tiny_recipe, trained, small, tmp_path):
    rd = _data_copy(small, tmp_path / "student")
    student_cfg = models.FAMILIES["cnn"].config_class(channels=(4, 4), pool_after=1, hidden=8)
    result = _train(tiny_recipe, rd, epochs=3, model_config=student_cfg, teacher=trained.checkpoint,
                    distill=train.Distill(teacher="tiny", temperature=2.0, alpha=0.7))
    history = json.loads(rd.history.read_text())
    assert history[-1]["train_loss"] < history[0]["train_loss"] and result.epochs_run == 3
    meta = checkpoint.read(rd.checkpoint)
    assert meta["distilled_from"] == str(trained.checkpoint)
    student = sum(v.numel() for v in meta["state_dict"].values())
    teacher = sum(v.numel() for v in checkpoint.read(trained.checkpoint)["state_dict"].values())
    assert student * 4 < teacher


def test_a_missing_teacher_names_the_command_that_makes_it(tmp_path, monkeypatch):
    from pipeline.orchestrate import resolve_checkpoint

    monkeypatch.chdir(tmp_path)
    with pytest.raises(StageError, match=r"train.distill.teacher `digits-cnn` has no checkpoint at "
                                         r"runs/digits-cnn/checkpoint.pt: train it first with `pipeline run "
                                         r"--recipe configs/digits-cnn.yaml` \(`make all`"):
        resolve_checkpoint("digits-cnn", "train.distill.teacher", recipe_names=True)
    with pytest.raises(StageError, match="--init-from `nope.pt` is neither a checkpoint file nor an MLflow run id"):
        resolve_checkpoint("nope.pt", "--init-from")


# ---------------------------------------------------------------- DDP

def test_two_process_ddp_on_cpu_finishes_and_records_once(tiny_yaml, small, tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline import orchestrate, tracking

    rd = _data_copy(small, tmp_path / "ddp")
    name = f"ddp-{tmp_path.name[-12:].strip('_')}"  # an experiment of its own in the session's store
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "pipeline.cli", "train", "--recipe", str(tiny_yaml), "--workdir", str(rd.root),
           "--set", "train.epochs=2", "--set", f"name={name}"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "x2 processes" in done.stderr

    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["world_size"] == "2"
    assert {a.path for a in client.list_artifacts(runs[0].info.run_id)} >= {"checkpoint.pt", "checkpoint.json"}
    assert sorted(p.name for p in rd.root.glob("*.pt")) == ["checkpoint.pt", "train_state.pt"]
    assert len(json.loads(rd.history.read_text())) == 2

    # The run id is enough to fine-tune from it: the pipeline downloads its checkpoint.
    path = orchestrate.resolve_checkpoint(runs[0].info.run_id, "--init-from")
    assert checkpoint.read(path)["run_id"] == runs[0].info.run_id


# ---------------------------------------------------------------- GPU (skipped without one)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")


@needs_cuda
@pytest.mark.parametrize("compile_", [False, True])
def test_cuda_trains_resident_in_bf16_with_channels_last(tiny_recipe, small, tmp_path, compile_):
    rd = _data_copy(small, tmp_path / "gpu")
    result = _train(tiny_recipe, rd, epochs=2, device="cuda", compile=compile_, augment_shift=1)
    assert (result.device, result.data_path) == ("cuda", "device")
    assert result.precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    history = json.loads(rd.history.read_text())
    assert history[-1]["train_loss"] < history[0]["train_loss"]


@needs_cuda
def test_cuda_dataloader_path_and_distillation(tiny_recipe, trained, small, tmp_path):
    rd = _data_copy(small, tmp_path / "gpu-loader")
    result = _train(tiny_recipe, rd, epochs=2, device="cuda", data_path="loader", teacher=trained.checkpoint,
                    distill=train.Distill(teacher="tiny"))
    assert result.data_path == "loader" and result.epochs_run == 2

