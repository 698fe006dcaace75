"""Optimizers and learning-rate schedules for the train stage, each in a table looked up by name.

``OPTIMIZERS`` maps a name to a builder ``(params, config, fused) -> torch.optim.Optimizer``.
``SCHEDULES`` maps a name to ``(config, progress) -> factor``: the learning rate at ``progress``
(epochs done, fractional) is ``config.lr * factor``. Reduce-on-plateau
is the one schedule with state (it reacts to validation); ``Plateau`` holds it and is saved with the
resumable training state. The train loop sets ``group["lr"]`` itself each step (as nanoGPT does), so
resuming needs no torch scheduler object, only the step count and the plateau state.

Parameter groups (``param_groups``): fine-tuning trains the backbone at ``backbone_lr_scale`` times
the head's rate; each group carries its ``lr_scale`` and the loop sets ``lr * lr_scale`` per group.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch

    from stages.train import Config


def _sgd(params, c: "Config", fused: bool):
    import torch

    # SGD's fused kernel is CUDA-only, like Adam's.
    return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov,
                           weight_decay=c.weight_decay, **({"fused": True} if fused else {}))


def _adam(params, c: "Config", fused: bool):
    import torch

    return torch.optim.Adam(params, lr=c.lr, betas=c.betas, weight_decay=c.weight_decay,
                            **({"fused": True} if fused else {}))


def _adamw(params, c: "Config", fused: bool):
    import torch

    return torch.optim.AdamW(params, lr=c.lr, betas=c.betas, weight_decay=c.weight_decay,
                             **({"fused": True} if fused else {}))


OPTIMIZERS: dict[str, Callable[..., "torch.optim.Optimizer"]] = {
    "sgd": _sgd,      # momentum (train.momentum) and Nesterov (train.nesterov)
    "adam": _adam,    # L2 penalty added to the gradient (coupled weight decay)
    "adamw": _adamw,  # decoupled weight decay (Loshchilov & Hutter)
}


def build_optimizer(name: str, params, config: "Config", *, fused: bool = False):
    """``params``: parameters, or groups from ``param_groups``. ``fused``: one CUDA kernel for the whole
    parameter update (fewer launches; CUDA only)."""
    return OPTIMIZERS[name](params, config, fused)


def param_groups(model, head: str = "", backbone_lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """The optimizer's groups: ``head`` (the parameters of module ``head``, at the full rate) and
    ``backbone`` (all others, at ``backbone_lr_scale`` x the rate); one group ``all`` when there is no
    head to tell apart. Parameters that do not require gradients are left out, as torch's own wrappers do."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not head:
        return [{"params": [p for _, p in named], "lr_scale": 1.0, "name": "all"}]
    in_head = [p for n, p in named if n.startswith(head + ".")]
    backbone = [p for n, p in named if not n.startswith(head + ".")]
    groups = [{"params": backbone, "lr_scale": float(backbone_lr_scale), "name": "backbone"},
              {"params": in_head, "lr_scale": 1.0, "name": "head"}]
    return [g for g in groups if g["params"]]


def _warmup(c: "Config", progress: float) -> float | None:
    """Linear warm-up from ~0 to 1 over ``warmup_epochs``; None once it is over."""
    if progress < c.warmup_epochs:
        return (progress + 1e-3) / c.warmup_epochs
    return None


def _constant(c: "Config", progress: float) -> float:
    w = _warmup(c, progress)
    return 1.0 if w is None else w


def _step(c: "Config", progress: float) -> float:
    w = _warmup(c, progress)
    return w if w is not None else c.gamma ** int((progress - c.warmup_epochs) // c.step_epochs)


def _cosine(c: "Config", progress: float) -> float:
    """Warm-up, then half a cosine from 1 down to ``min_lr_ratio`` at the last epoch."""
    w = _warmup(c, progress)
    if w is not None:
        return w
    t = min(1.0, (progress - c.warmup_epochs) / max(1e-9, c.epochs - c.warmup_epochs))
    return c.min_lr_ratio + (1.0 - c.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def _one_cycle(c: "Config", progress: float) -> float:
    """Smith's one-cycle as torch's OneCycleLR draws it (cosine annealing, learning rate only):
    from lr/25 up to lr over the first ``pct_start`` of training, then down to lr/25/1e4."""
    start, end = 1.0 / 25.0, 1.0 / 25.0 / 1e4
    t = progress / c.epochs
    if t < c.pct_start:
        u = t / c.pct_start
        return start + (1.0 - start) * 0.5 * (1.0 - math.cos(math.pi * u))
    u = min(1.0, (t - c.pct_start) / max(1e-9, 1.0 - c.pct_start))
    return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * u))


def _plateau(c: "Config", progress: float) -> float:
    # The plateau factor itself lives in Plateau (it depends on validation); this is the warm-up part.
    return _constant(c, progress)


SCHEDULES: dict[str, Callable[["Config", float], float]] = {
    "constant": _constant,
    "step": _step,            # x gamma every step_epochs
    "cosine": _cosine,        # warm-up, then cosine to min_lr_ratio
    "one-cycle": _one_cycle,  # up then down, pct_start of training rising
    "plateau": _plateau,      # x gamma when the monitored metric stalls plateau_patience epochs
}


@dataclass
class Plateau:
    """Reduce-on-plateau state: multiply the rate by ``gamma`` after ``patience`` epochs without
    an improvement of the monitored validation metric (``mode``: "max" or "min")."""

    gamma: float
    patience: int
    mode: str
    best: float | None = None
    bad_epochs: int = 0
    factor: float = 1.0

    def update(self, value: float) -> None:
        better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
        if better:
            self.best, self.bad_epochs = value, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs > self.patience:
            self.factor *= self.gamma
            self.bad_epochs = 0

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def lr_at(config: "Config", progress: float, plateau: Plateau | None = None) -> float:
    """Learning rate after ``progress`` epochs (fractional). Warm-up and one-cycle move every step;
    after warm-up the epoch schedules (constant, step, cosine, plateau) hold each epoch at the rate of
    its start, as the first version of this stage did (a per-step cosine trains short runs ~20% less)."""
    if config.schedule != "one-cycle" and progress >= config.warmup_epochs:
        progress = math.floor(progress)
    factor = SCHEDULES[config.schedule](config, progress)
    if plateau is not None:
        factor *= plateau.factor
    return config.lr * factor
