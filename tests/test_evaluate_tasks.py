"""evaluate for every task: a model trained here with compute_loss (a few hundred cheap steps) is
checkpointed, and evaluate writes metrics.json with the task's primary metric and its plot."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import models
from stages.contract import RunDir
from stages.contract import NullTracker
from stages import checkpoint, dataset, evaluate, prepare
from stages.losses import compute_loss


def train_and_checkpoint(rd: RunDir, family: str, config, steps: int, lr: float) -> dict:
    data = dataset.load(rd.data, rd.dataset)
    task = models.resolve_task(family, data.task)
    x, y = (torch.from_numpy(a) for a in data.split("train"))
    torch.manual_seed(0)
    shape = tuple(data.info["input_shape"])
    model = models.build(family, config, shape, data.num_outputs)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for step in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=torch.Generator().manual_seed(step))
        loss, _ = compute_loss(task, model(x[idx]), x[idx] if task == "vae" else y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    checkpoint.save(rd.checkpoint, model, {
        "model": models.describe(family, config, shape, data.num_outputs), "task": task,
        "label_names": data.labels, "input_layout": data.info["input_layout"],
        "normalization": data.info["normalization"], "dataset_sha256": data.info["sha256"],
        "dataset_source": data.info["source"], "recipe": {}, "run_id": None, "epoch": 1})
    return data.info


def test_evaluate_regression_writes_r2_and_a_scatter(tmp_path):
    rd = RunDir(tmp_path).ensure()
    prepare.run(prepare.Config(dataset="diabetes"), rd, NullTracker())
    train_and_checkpoint(rd, "linear", models.linear.Config(), steps=300, lr=1.0)
    result = evaluate.run(evaluate.Config(device="cpu"), rd, NullTracker())
    metrics = json.loads(rd.metrics.read_text())
    assert metrics["task"] == "regression" and metrics["primary"]["name"] == "r2"
    # ordinary least squares reaches r2 0.34 on this test split; predicting the mean gives 0
    assert metrics["r2"] > 0.2, "linear regression on diabetes explains a good part of the variance"
    assert metrics["mse"] > 0 and metrics["mae"] > 0 and "disease_progression" in metrics["per_target"]
    assert result.metric == "r2" and "r2" in result.summary()
    assert rd.predictions_plot.stat().st_size > 1000


def test_evaluate_vae_writes_reconstruction_metrics_and_a_grid(tmp_path):
    rd = RunDir(tmp_path).ensure()
    prepare.run(prepare.Config(dataset="digits", max_samples=300), rd, NullTracker())
    train_and_checkpoint(rd, "vae", models.vae.Config(hidden=(64,), latent_dim=4), steps=150, lr=3e-3)
    evaluate.run(evaluate.Config(device="cpu"), rd, NullTracker())
    metrics = json.loads(rd.metrics.read_text())
    assert metrics["task"] == "vae"
    assert metrics["primary"] == {"name": "reconstruction_mse", "value": metrics["reconstruction_mse"],
                                  "higher_is_better": False}
    assert 0 < metrics["reconstruction_mse"] < 1.0, "better than predicting the mean (MSE 1 on normalized pixels)"
    assert metrics["kl"] > 0 and metrics["elbo"] < 0
    assert rd.reconstructions.stat().st_size > 1000


def test_evaluate_classification_keeps_its_keys_and_adds_primary(evaluated):
    metrics = json.loads(evaluated.metrics.read_text())
    assert metrics["task"] == "classification"
    assert metrics["primary"] == {"name": "accuracy", "value": metrics["accuracy"], "higher_is_better": True}
    assert np.asarray(metrics["confusion_matrix"]).sum() == metrics["samples"]
