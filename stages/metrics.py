"""Classification metrics and the confusion-matrix plot, for any predictor's logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stages.common import atomic_path


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


def plot_history(history: list[dict], path: Path) -> Path:
    """Loss and accuracy per epoch, train beside validation."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=120)
    for split in ("train", "val"):
        ax_loss.plot(epochs, [h[f"{split}_loss"] for h in history], label=split)
        ax_acc.plot(epochs, [h[f"{split}_accuracy"] for h in history], label=split)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
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
