"""Quality metrics per task and their plots, for any predictor's outputs.

``score(task, y_true, outputs, labels)`` is the one entry point: it always returns a ``primary``
entry (name, value, higher_is_better) that evaluate, quantize's budget and register compare on:
classification accuracy (higher is better), regression r2 (higher), vae reconstruction_mse (lower).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from stages.common import atomic_path

PRIMARY = {  # task -> (metric name, higher is better)
    "classification": ("accuracy", True),
    "regression": ("r2", True),
    "vae": ("reconstruction_mse", False),
}


def score(task: str, y_true: np.ndarray, outputs: Any, labels: Sequence[str]) -> dict:
    """Metrics of ``outputs`` against the truth, with a ``primary`` entry.

    classification: ``outputs`` are logits (N, C), ``y_true`` class indices, ``labels`` class names.
    regression: ``outputs`` are predictions (N, T) (or (N,)), ``y_true`` (N, T), ``labels`` target names.
    vae: ``outputs`` is (reconstruction, mu, logvar) (a sequence, or a dict with those names) and
    ``y_true`` the (normalized) inputs themselves; ``labels`` is unused.
    """
    if task == "classification":
        metrics = classification_metrics(y_true, np.asarray(outputs), list(labels))
    elif task == "regression":
        metrics = regression_metrics(y_true, np.asarray(outputs), list(labels))
    elif task == "vae":
        metrics = vae_metrics(y_true, outputs)
    else:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(PRIMARY)}")
    name, higher = PRIMARY[task]
    return {"task": task, "primary": {"name": name, "value": metrics[name], "higher_is_better": higher}, **metrics}


def regression_metrics(y_true: np.ndarray, predictions: np.ndarray, target_names: list[str]) -> dict:
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    y = np.asarray(y_true, dtype=np.float64).reshape(len(y_true), -1)
    p = np.asarray(predictions, dtype=np.float64).reshape(len(predictions), -1)
    if y.shape != p.shape:
        raise ValueError(f"predictions have shape {list(p.shape)} but targets {list(y.shape)}")
    names = list(target_names) or [f"target_{i}" for i in range(y.shape[1])]
    return {
        "r2": float(r2_score(y, p)),  # uniform average over targets
        "mse": float(mean_squared_error(y, p)),
        "mae": float(mean_absolute_error(y, p)),
        "samples": int(len(y)),
        "per_target": {names[i]: {"r2": float(r2_score(y[:, i], p[:, i])),
                                  "mse": float(mean_squared_error(y[:, i], p[:, i])),
                                  "mae": float(mean_absolute_error(y[:, i], p[:, i]))} for i in range(y.shape[1])},
    }


def vae_metrics(x: np.ndarray, outputs: Any) -> dict:
    if isinstance(outputs, dict):
        outputs = (outputs["reconstruction"], outputs["mu"], outputs["logvar"])
    rec, mu, logvar = (np.asarray(o, dtype=np.float64) for o in outputs)
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    sse = ((rec - x) ** 2).reshape(n, -1).sum(axis=1)  # per sample
    kl = -0.5 * (1 + logvar - mu ** 2 - np.exp(logvar)).reshape(n, -1).sum(axis=1)
    return {
        "reconstruction_mse": float(((rec - x) ** 2).mean()),  # per input element, in normalized units
        "kl": float(kl.mean()),
        # Gaussian (unit variance) log-likelihood up to its constant, minus KL; per sample, higher is better.
        "elbo": float(-(sse + kl).mean()),
        "samples": int(n),
    }


def classification_metrics(y_true: np.ndarray, logits: np.ndarray, labels: list[str]) -> dict:
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    y_pred = logits.argmax(axis=1)
    idx = list(range(len(labels)))
    p, r, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=idx, zero_division=0)
    return {
        "accuracy": float((y_pred == y_true).mean()),
        "macro_f1": float(f1.mean()),
        "samples": int(len(y_true)),
        "per_class": {labels[i]: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f1[i]),
                                  "support": int(support[i])} for i in idx},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=idx).tolist(),
    }


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    _pyplot().close(fig)
    return Path(path)


def plot_history(history: list[dict], path: Path, metric: str = "accuracy") -> Path:
    """Loss and ``metric`` (accuracy, r2, reconstruction_mse, ...) per epoch, train beside validation
    where both were recorded."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=120)
    for split in ("train", "val"):
        ax_loss.plot(epochs, [h[f"{split}_loss"] for h in history], label=split)
        if f"{split}_{metric}" in history[0]:
            ax_metric.plot(epochs, [h[f"{split}_{metric}"] for h in history], label=split)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_metric.set(xlabel="epoch", ylabel=metric, title=metric)
    ax_loss.legend()
    fig.tight_layout()
    return _save(fig, path)


def plot_confusion(matrix: list[list[int]], labels: list[str], path: Path, title: str) -> Path:
    plt = _pyplot()
    cm = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(1.0 + 0.5 * len(labels), 0.8 + 0.5 * len(labels)), dpi=120)
    ax.imshow(cm, cmap="Blues")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                        color="white" if cm[i, j] > cm.max() / 2 else "black", fontsize=8)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_regression(y_true: np.ndarray, predictions: np.ndarray, target_names: list[str], path: Path,
                    title: str) -> Path:
    """Predicted against true, one panel per target, with the identity line."""
    plt = _pyplot()
    y = np.asarray(y_true).reshape(len(y_true), -1)
    p = np.asarray(predictions).reshape(len(predictions), -1)
    k = y.shape[1]
    fig, axes = plt.subplots(1, k, figsize=(4 * k, 4), dpi=120, squeeze=False)
    for i, ax in enumerate(axes[0]):
        ax.scatter(y[:, i], p[:, i], s=8, alpha=0.6)
        lo, hi = float(min(y[:, i].min(), p[:, i].min())), float(max(y[:, i].max(), p[:, i].max()))
        ax.plot([lo, hi], [lo, hi], color="gray", linewidth=1)
        ax.set(xlabel=f"true {target_names[i] if i < len(target_names) else ''}".strip(), ylabel="predicted")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_reconstructions(originals: np.ndarray, reconstructions: np.ndarray, path: Path, title: str,
                         count: int = 8) -> Path:
    """Originals (top row) above their reconstructions (bottom row); images (N, C, H, W) show their first
    channel, signals (N, C, L) and feature vectors are drawn as lines."""
    plt = _pyplot()
    count = min(count, len(originals))
    fig, axes = plt.subplots(2, count, figsize=(1.3 * count, 2.8), dpi=120, squeeze=False)
    for j in range(count):
        for row, arr in enumerate((originals, reconstructions)):
            ax = axes[row][j]
            item = np.asarray(arr[j])
            if item.ndim == 3:
                ax.imshow(item[0], cmap="gray")
            else:
                ax.plot(item.reshape(-1) if item.ndim != 2 else item[0])
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0][j].set_title(str(j), fontsize=7)
    axes[0][0].set_ylabel("original")
    axes[1][0].set_ylabel("reconstruction")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)
