"""train: AdamW + cross-entropy over the prepared split, best-on-validation checkpoint.

One readable loop: set the learning rate, train an epoch, evaluate on validation, log, keep the best.
The splits are small, so each lives whole on the training device as a tensor and is shuffled by
index with a seeded generator: no DataLoader workers, and the same recipe gives the same metrics on
the same machine.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

import models
from stages import checkpoint, dataset
from stages.common import seed_everything, write_json
from stages.metrics import plot_history
from stages.predictors import torch_device

if TYPE_CHECKING:
    from pipeline.rundir import RunDir
    from pipeline.tracking import Tracker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Config:
    epochs: int = 40
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: int = 2  # linear warm-up before the cosine decay
    label_smoothing: float = 0.0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"`epochs` must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"`lr` must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"`weight_decay` must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(f"`warmup_epochs` must be between 0 and epochs-1 ({self.epochs - 1}), got {self.warmup_epochs}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"`label_smoothing` must be in [0, 1), got {self.label_smoothing}")


@dataclass(frozen=True)
class Result:
    best_epoch: int
    val_accuracy: float
    val_loss: float
    device: str
    seconds: float
    run_id: str | None

    def summary(self) -> str:
        return f"val_acc {self.val_accuracy:.4f} (epoch {self.best_epoch}, {self.device})"


def lr_at(config: Config, epoch: int) -> float:
    """Learning rate for a 0-based epoch: linear warm-up, then constant or cosine to 0."""
    if epoch < config.warmup_epochs:
        return config.lr * (epoch + 1) / (config.warmup_epochs + 1)
    if config.schedule == "constant":
        return config.lr
    progress = (epoch - config.warmup_epochs) / max(1, config.epochs - config.warmup_epochs)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def run(config: Config, rundir: "RunDir", tracker: "Tracker", *, family: str, model_config: Any,
        recipe: dict | None = None, device: str | None = None) -> Result:
    import torch
    import torch.nn.functional as F

    device = torch_device(device or config.device)
    tracker.log_params({**asdict(config), "device": device, "model.family": family,
                        **{f"model.{k}": v for k, v in asdict(model_config).items()}})
    seed_everything(config.seed)
    if device == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True

    data = dataset.load(rundir.data, rundir.dataset)
    info = data.info
    as_tensors = lambda split: tuple(torch.from_numpy(a).to(device) for a in data.split(split))
    x_train, y_train = as_tensors("train")
    x_val, y_val = as_tensors("val")

    model = models.build(family, model_config, tuple(info["input_shape"]), info["num_classes"]).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    tracker.log_params({"model.parameters": n_params})
    log.info("training %s (%d parameters) on %s for %d epochs", family, n_params, device, config.epochs)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator(device="cpu").manual_seed(config.seed)
    description = models.describe(family, model_config, tuple(info["input_shape"]), info["num_classes"])

    best = {"epoch": -1, "val_accuracy": -1.0, "val_loss": math.inf}
    history = []
    t0 = time.perf_counter()
    for epoch in range(config.epochs):
        lr = lr_at(config, epoch)
        for group in opt.param_groups:
            group["lr"] = lr

        model.train()
        order = torch.randperm(len(x_train), generator=gen).to(device)
        loss_sum, correct = 0.0, 0
        for i in range(0, len(order), config.batch_size):
            idx = order[i:i + config.batch_size]
            logits = model(x_train[idx])
            loss = F.cross_entropy(logits, y_train[idx], label_smoothing=config.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == y_train[idx]).sum().item()
        train_loss, train_acc = loss_sum / len(order), correct / len(order)

        model.eval()
        with torch.inference_mode():
            logits = model(x_val)
            val_loss = F.cross_entropy(logits, y_val).item()
            val_acc = (logits.argmax(1) == y_val).float().mean().item()

        row = {"train_loss": train_loss, "train_accuracy": train_acc, "val_loss": val_loss,
               "val_accuracy": val_acc, "lr": lr}
        history.append({"epoch": epoch + 1, **row})
        tracker.log_metrics(row, step=epoch + 1)
        log.info("epoch %3d/%d  lr %.2e  train loss %.4f acc %.4f  val loss %.4f acc %.4f",
                 epoch + 1, config.epochs, lr, train_loss, train_acc, val_loss, val_acc)

        # Best on validation accuracy; ties go to the lower validation loss.
        if (val_acc, -val_loss) > (best["val_accuracy"], -best["val_loss"]):
            best = {"epoch": epoch + 1, "val_accuracy": val_acc, "val_loss": val_loss}
            checkpoint.save(rundir.checkpoint, model, {
                "model": description,
                "label_names": data.labels,
                "input_layout": info["input_layout"],
                "normalization": info["normalization"],
                "dataset_sha256": info["sha256"],
                "dataset_source": info["source"],
                "recipe": recipe or {},
                "run_id": tracker.run_id,
                "epoch": epoch + 1,
                "val_accuracy": val_acc,
                "val_loss": val_loss,
                "train_device": device,
            }, json_path=rundir.checkpoint_json)

    seconds = time.perf_counter() - t0
    write_json(rundir.history, history)
    plot_history(history, rundir.training_curves)
    tracker.log_metrics({"best_epoch": best["epoch"], "best_val_accuracy": best["val_accuracy"],
                         "train_seconds": seconds,
                         "train_samples_per_s": config.epochs * len(x_train) / seconds})
    tracker.set_tags({"device": device})
    tracker.log_artifact(rundir.training_curves)
    tracker.log_artifact(rundir.checkpoint_json)
    tracker.log_artifact(rundir.checkpoint)
    return Result(best_epoch=best["epoch"], val_accuracy=best["val_accuracy"], val_loss=best["val_loss"],
                  device=device, seconds=seconds, run_id=tracker.run_id)
