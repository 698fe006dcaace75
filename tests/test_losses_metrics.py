"""compute_loss per task against hand-computed values, and score()'s primary metric per task."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stages.losses import compute_loss
from stages.metrics import score


def test_classification_loss_is_cross_entropy():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 1])
    loss, parts = compute_loss("classification", logits, y)
    expected = -(math.log(math.exp(2) / (math.exp(2) + 1)) + math.log(math.e / (1 + math.e))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6) and parts["cross_entropy"] == pytest.approx(expected)
    smoothed, _ = compute_loss("classification", logits, y, label_smoothing=0.2)
    assert smoothed.item() > loss.item()


def test_regression_loss_is_mse_and_checks_shapes():
    loss, parts = compute_loss("regression", torch.tensor([[1.0], [3.0]]), torch.tensor([[0.0], [0.0]]))
    assert loss.item() == pytest.approx(5.0) and parts == {"mse": pytest.approx(5.0)}
    with pytest.raises(ValueError, match=r"\(N, T\)"):
        compute_loss("regression", torch.zeros(2, 1), torch.zeros(2))


def test_vae_loss_is_reconstruction_plus_weighted_kl():
    x = torch.zeros(2, 3)
    rec = torch.ones(2, 3)  # squared error 3 per sample
    mu = torch.tensor([[1.0], [1.0]])  # KL per sample: 0.5 * mu^2 = 0.5 (logvar 0)
    logvar = torch.zeros(2, 1)
    loss, parts = compute_loss("vae", (rec, mu, logvar), x, kl_weight=2.0)
    assert parts["reconstruction"] == pytest.approx(3.0) and parts["kl"] == pytest.approx(0.5)
    assert loss.item() == pytest.approx(3.0 + 2.0 * 0.5) and parts["neg_elbo"] == pytest.approx(3.5)


def test_unknown_task_is_refused():
    with pytest.raises(ValueError, match="unknown task"):
        compute_loss("ranking", torch.zeros(1), torch.zeros(1))


def test_score_has_a_primary_metric_per_task():
    cls = score("classification", np.array([0, 1, 1]), np.array([[2.0, 0], [0, 1], [3, 0]]), ["a", "b"])
    assert cls["primary"] == {"name": "accuracy", "value": pytest.approx(2 / 3), "higher_is_better": True}
    assert cls["confusion_matrix"] == [[1, 0], [1, 1]]

    y = np.array([[1.0], [2.0], [3.0], [4.0]])
    reg = score("regression", y, y + np.array([[0.5], [-0.5], [0.5], [-0.5]]), ["target"])
    assert reg["primary"]["name"] == "r2" and reg["primary"]["higher_is_better"]
    assert reg["r2"] == pytest.approx(1 - 1.0 / 5.0) and reg["mse"] == pytest.approx(0.25)
    assert reg["mae"] == pytest.approx(0.5) and reg["per_target"]["target"]["r2"] == pytest.approx(0.8)

    x = np.zeros((2, 4))
    vae = score("vae", x, (np.full((2, 4), 0.5), np.zeros((2, 2)), np.zeros((2, 2))), [])
    assert vae["primary"] == {"name": "reconstruction_mse", "value": pytest.approx(0.25), "higher_is_better": False}
    assert vae["kl"] == pytest.approx(0.0) and vae["elbo"] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="unknown task"):
        score("ranking", x, x, [])
