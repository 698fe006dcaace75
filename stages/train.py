"""train: one readable loop over the prepared split -> the best-on-validation (or last) checkpoint.

Per step: set the learning rate, forward under autocast, loss, backward, clip, optimizer step. Per
epoch: validate, log, keep the best (or, train.keep: last, the final) checkpoint, save the resumable
state every ``checkpoint_every`` epochs, stop early when the monitored metric stalls. ``setup`` builds
what the loop reads (a frozen ``Setup``: data, model, optimizer, loss) and what it changes (``State``:
fresh, or restored from train_state.pt); ``loop`` is the epochs. Optimizers and schedules are tables in stages/optim.py;
torchrun data parallelism lives in stages/distributed.py; checkpoint formats in stages/checkpoint.py.

Fine-tuning (``train.finetune``, or ``--init-from``): the model starts from other weights (a checkpoint,
a state dict or a .safetensors file; stages/checkpoint.py ``load_weights`` reports which tensors were
loaded, skipped, missing), with a new head when the label set differs; the backbone may stay frozen for
the first ``freeze_epochs`` epochs (one named step in the loop) and learn at ``backbone_lr_scale`` times
the head's rate after (parameter groups, stages/optim.py).

Speed tricks, each switched by the config and named where it is applied:
- GPU-resident data: the whole split lives on the device, shuffled by an index permutation drawn on
  the device; a batch is one gather, no host->device copy, no worker processes. Chosen when the split
  takes < ``RESIDENT_FRACTION`` of the device's free memory, else a DataLoader with pinned memory and
  workers. On CPU the split is in memory anyway, so it is always resident unless asked otherwise.
- No ``.item()`` per step: loss and accuracy sums accumulate on the device and are read once per
  epoch (every ``.item()`` is a host-device synchronization that stalls the GPU's queue).
- bf16 autocast on CUDA (tensor cores, half the activation memory; bf16 keeps fp32's range, so no
  loss scaling); fp16 with a GradScaler on GPUs without bf16; fp32 on CPU unless asked.
- ``channels_last`` for image inputs (N, C, H, W) on CUDA (cuDNN's NHWC convolution kernels avoid
  layout transposes).
- ``torch.compile`` (optional: it pays off on long runs, costs tens of seconds of compilation).
- cuDNN autotuning (``benchmark``) unless ``deterministic``; fused AdamW/Adam/SGD kernels on CUDA.
- Distillation: teacher logits computed once for the whole training split when inputs are not
  augmented (the teacher is frozen and in eval mode, so they never change).
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import models
from stages import checkpoint, dataset, distributed, optim
from stages.common import InputError, StageError, seed_everything, write_json
from stages.losses import compute_loss
from stages.metrics import PRIMARY, plot_history, score
from stages.predictors import torch_device
from stages.contract import RunDir, Tracker


log = logging.getLogger(__name__)

# A split is kept on the GPU when it takes less than this share of the free device memory, leaving
# the rest for weights, optimizer state and activations.
RESIDENT_FRACTION = 0.25
EVAL_CHUNK = 1024  # samples per validation forward pass (bounds activation memory)


@dataclass(frozen=True)
class EarlyStopping:
    patience: int = 0  # epochs without improvement before stopping; 0: never stop early
    metric: str = "auto"  # a validation metric (val_loss, val_accuracy, ...); auto: the task's primary one
    min_delta: float = 0.0  # an improvement smaller than this (in the metric's units) does not count

    def __post_init__(self) -> None:
        if self.patience < 0:
            raise ValueError(f"`patience` must be >= 0 (0: off), got {self.patience}")
        if self.min_delta < 0:
            raise ValueError(f"`min_delta` must be >= 0, got {self.min_delta}")
        if self.metric != "auto" and not self.metric.startswith("val_"):
            raise ValueError(f"`metric` must be auto or a validation metric such as val_loss or val_accuracy, "
                             f"got {self.metric!r}")


@dataclass(frozen=True)
class Distill:
    # A checkpoint path, an MLflow run id, or a recipe name (its runs/<name>/checkpoint.pt); "" is off.
    teacher: str = ""
    temperature: float = 4.0  # softens both distributions; the soft term is scaled by T^2
    alpha: float = 0.9  # weight of the soft (teacher) term; 1 - alpha weighs cross-entropy on labels

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"`temperature` must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"`alpha` must be in [0, 1], got {self.alpha}")


@dataclass(frozen=True)
class Finetune:
    # Weights to start from: a .pt/.pth state dict or checkpoint, a .safetensors file, an MLflow run id,
    # or a recipe name (its runs/<name>/checkpoint.pt); "": none. `--init-from` names them on the CLI.
    weights: str = ""
    strict: bool = True  # every tensor but the head's must load; false: load what fits, report the rest
    head: str = "auto"  # the output layer's module name, e.g. fc; auto: the family's (models.output_layer)
    freeze_epochs: int = 0  # train only the head for this many epochs, then everything
    backbone_lr_scale: float = 1.0  # the backbone's learning rate as a fraction of the head's (train.lr)

    def __post_init__(self) -> None:
        if self.freeze_epochs < 0:
            raise ValueError(f"`freeze_epochs` must be >= 0 (0: never frozen), got {self.freeze_epochs}")
        if not 0.0 < self.backbone_lr_scale <= 1.0:
            raise ValueError(f"`backbone_lr_scale` must be in (0, 1] (a backbone that never learns: freeze_epochs "
                             f"= train.epochs), got {self.backbone_lr_scale}")
        if not self.head:
            raise ValueError("`head` must be auto or the output layer's module name, e.g. fc")


@dataclass(frozen=True)
class Config:
    epochs: int = 40
    batch_size: int = 64  # global: under torchrun each of N processes takes batch_size / N per step
    optimizer: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: float = 3e-3  # peak learning rate
    weight_decay: float = 1e-4
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    betas: tuple[float, ...] = (0.9, 0.999)  # adam, adamw
    schedule: Literal["constant", "step", "cosine", "one-cycle", "plateau"] = "cosine"
    warmup_epochs: int = 2  # linear warm-up (constant, step, cosine, plateau)
    min_lr_ratio: float = 0.0  # cosine: the final rate as a fraction of lr
    step_epochs: int = 10  # step: multiply by gamma every this many epochs
    gamma: float = 0.1  # step and plateau: the factor
    pct_start: float = 0.3  # one-cycle: share of training spent rising
    plateau_patience: int = 3  # plateau: epochs without improvement before multiplying by gamma
    grad_clip: float = 0.0  # max global gradient norm; 0: off
    label_smoothing: float = 0.0  # classification
    kl_weight: float = 1.0  # vae: weight of the KL term of the negative ELBO
    early_stopping: EarlyStopping = field(default_factory=EarlyStopping)
    distill: Distill = field(default_factory=Distill)
    finetune: Finetune = field(default_factory=Finetune)
    augment_shift: int = 0  # random shifts of up to this many pixels (images) or steps (signals), on the device; 0: off
    augment_wrap: bool = False  # shifted-out values wrap around (circular shift) instead of edges being replicated
    # The weights the run keeps (checkpoint.pt, exported and scored): best, the epoch with the best primary
    # validation metric (ties: lower val_loss); last, the final epoch's (with a schedule that decays to ~0 the
    # converged model, not a one-epoch spike of a small validation split; early stopping's or a pruner's stop
    # epoch when they stop the run).
    keep: Literal["best", "last"] = "best"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 (else fp16) on CUDA, fp32 on CPU
    compile: bool = False  # torch.compile the model
    channels_last: Literal["auto", "on", "off"] = "auto"  # auto: on for 2-D inputs on CUDA
    data_path: Literal["auto", "device", "loader"] = "auto"  # auto: resident when it fits (see RESIDENT_FRACTION)
    loader_workers: int = 2  # DataLoader path only
    deterministic: bool = False  # CUDA: deterministic cuDNN kernels instead of autotuned ones
    checkpoint_every: int = 1  # epochs between resumable states (train_state.pt)
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
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"`momentum` must be in [0, 1), got {self.momentum}")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ValueError(f"`nesterov` needs optimizer sgd with momentum > 0, got {self.optimizer} "
                             f"with momentum {self.momentum}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"`betas` must be two numbers in [0, 1), got {list(self.betas)}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(f"`warmup_epochs` must be between 0 and epochs-1 ({self.epochs - 1}), got {self.warmup_epochs}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"`min_lr_ratio` must be in [0, 1], got {self.min_lr_ratio}")
        if self.step_epochs < 1:
            raise ValueError(f"`step_epochs` must be >= 1, got {self.step_epochs}")
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"`gamma` must be in (0, 1], got {self.gamma}")
        if not 0.0 < self.pct_start < 1.0:
            raise ValueError(f"`pct_start` must be in (0, 1), got {self.pct_start}")
        if self.plateau_patience < 0:
            raise ValueError(f"`plateau_patience` must be >= 0, got {self.plateau_patience}")
        if self.grad_clip < 0:
            raise ValueError(f"`grad_clip` must be >= 0 (0: off), got {self.grad_clip}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"`label_smoothing` must be in [0, 1), got {self.label_smoothing}")
        if self.kl_weight < 0:
            raise ValueError(f"`kl_weight` must be >= 0, got {self.kl_weight}")
        if not 0 <= self.augment_shift <= 32:
            raise ValueError(f"`augment_shift` must be between 0 (off) and 32 pixels or steps, got {self.augment_shift}")
        if self.loader_workers < 0:
            raise ValueError(f"`loader_workers` must be >= 0, got {self.loader_workers}")
        if self.checkpoint_every < 1:
            raise ValueError(f"`checkpoint_every` must be >= 1, got {self.checkpoint_every}")
        if self.finetune.freeze_epochs > self.epochs:
            raise ValueError(f"`finetune.freeze_epochs` must be at most epochs ({self.epochs}), got "
                             f"{self.finetune.freeze_epochs}")


# Keys that change how a run is computed but not what it computes: a resumed run may change them.
RESUMABLE_CHANGES = {"checkpoint_every", "loader_workers", "compile"}


@dataclass(frozen=True)
class Result:
    best_epoch: int
    metric: str  # the task's primary validation metric, e.g. val_accuracy
    value: float
    val_loss: float
    epochs_run: int
    stopped_early: bool
    device: str
    data_path: str  # device (resident) or loader
    precision: str
    seconds: float
    samples_per_s: float
    run_id: str | None
    resumed_from_epoch: int = 0

    @property
    def val_accuracy(self) -> float:
        return self.value

    def summary(self) -> str:
        name = "val_acc" if self.metric == "val_accuracy" else self.metric
        stop = f", stopped early at {self.epochs_run}" if self.stopped_early else ""
        return f"{name} {self.value:.4f} (epoch {self.best_epoch}{stop}, {self.device})"


def run(config: Config, rundir: "RunDir", tracker: "Tracker", *, family: str, model_config: Any,
        recipe: dict | None = None, device: str | None = None, resume: bool = False,
        init_from: Path | None = None, teacher: Path | None = None) -> Result:
    """Train; ``resume`` continues from rundir's train_state.pt, ``init_from`` is the weights file to
    start from (``--init-from`` or ``config.finetune.weights``, resolved to a local file), ``teacher`` is
    the resolved checkpoint of ``config.distill.teacher``."""
    import torch

    world = distributed.world_from_env()
    device = torch_device(device or config.device)
    if device == "cuda" and world.distributed:
        device = f"cuda:{world.local_rank}"
        torch.cuda.set_device(device)
    created, finished = distributed.init(world, device), False
    try:
        s, state = setup(config, rundir, tracker, world=world, device=device, family=family,
                         model_config=model_config, recipe=recipe, resume=resume, init_from=init_from, teacher=teacher)
        t0 = time.perf_counter()
        samples_seen = loop(s, state, rundir, tracker)
        result = _finish(s, state, rundir, tracker, seconds=time.perf_counter() - t0, samples_seen=samples_seen)
        finished = True
        return result
    finally:
        distributed.shutdown(created, finished)


# ---------------------------------------------------------------- what the loop reads and changes

@dataclass(frozen=True)
class Split:
    """The training and validation data where the loop reads them: resident on the device (one gather
    per batch), or on the host behind a DataLoader (``loader``, fed this epoch's order by ``sampler``)."""

    x_train: Any
    y_train: Any
    x_val: Any
    y_val: Any
    resident: bool
    device: str
    per_rank_batch: int  # train.batch_size / processes
    shuffle: Any  # torch.Generator: each epoch's permutation, augmentation shifts (on the device if resident)
    loader: Any = None
    sampler: _Order | None = None

    def epoch(self, world: distributed.World):
        """-> (this rank's share of a fresh permutation, its batches of (idx, x, y) on the device)."""
        import torch

        order = distributed.shard(torch.randperm(len(self.x_train), generator=self.shuffle,
                                                 device=self.shuffle.device), world)
        if self.resident:
            return order, ((idx, self.x_train[idx], self.y_train[idx]) for idx in order.split(self.per_rank_batch))
        self.sampler.order = order.tolist()
        device = self.device  # non_blocking: copies from pinned memory overlap with compute
        return order, ((idx.to(device, non_blocking=True), xb.to(device, non_blocking=True),
                        yb.to(device, non_blocking=True)) for xb, yb, idx in self.loader)


@dataclass(frozen=True)
class Setup:
    """Everything the loop reads, built once by ``setup``. Frozen: the loop never rebinds these; the
    model, optimizer, gradient scaler and plateau they hold are what it trains."""

    config: Config
    world: distributed.World
    device: str
    task: str
    labels: list[str]
    data: Split
    precision: str  # fp32, bf16 or fp16
    channels_last: bool
    memory_format: Any  # torch.channels_last or torch.contiguous_format
    autocast: Callable[[], Any]  # a fresh autocast context for this device and precision
    model: Any  # the module itself: what checkpoints hold
    step_model: Any  # what a step calls: the model wrapped for DDP and compiled, where asked
    opt: Any
    scaler: Any  # fp16's GradScaler; a pass-through otherwise
    plateau: optim.Plateau | None  # reduce-on-plateau's state (schedule plateau only)
    loss_fn: Callable  # (outputs, targets, idx, inputs) -> (loss, parts), see _loss_fn
    primary: str  # the task's primary validation metric: the best checkpoint is chosen on it
    monitor: str  # the validation metric early stopping and reduce-on-plateau watch
    checkpoint_meta: dict  # what checkpoint.pt says besides the epoch and its scores
    fingerprint: dict  # what train_state.pt must match to be resumed
    head: str = ""  # fine-tuning: the output layer's module name; "" when nothing tells it apart
    backbone: tuple = ()  # fine-tuning: the parameters frozen for the first finetune.freeze_epochs epochs


@dataclass
class State:
    """What the loop changes; train_state.pt saves it beside the model, optimizer and RNG states."""

    start_epoch: int  # epochs already done (a resumed run's); the loop starts at the next one
    best: dict  # {"epoch", "value" (of the primary metric), "val_loss"}; epoch 0: none yet
    early_stop: dict  # {"best" (of the monitored metric), "bad_epochs", "stopped"}
    history: list[dict]  # one row per epoch: train and validation metrics, lr
    resumed: bool = False

    @classmethod
    def fresh(cls, primary: str) -> "State":
        worst = math.inf if _lower_is_better(primary) else -math.inf
        return cls(0, {"epoch": 0, "value": worst, "val_loss": math.inf}, {"best": None, "bad_epochs": 0}, [])

    @property
    def stopped_early(self) -> bool:
        return bool(self.early_stop.get("stopped"))


# ---------------------------------------------------------------- setup

def setup(config: Config, rundir: "RunDir", tracker: "Tracker", *, world: distributed.World, device: str,
          family: str, model_config: Any, recipe: dict | None = None, resume: bool = False,
          init_from: Path | None = None, teacher: Path | None = None) -> tuple[Setup, State]:
    """Everything before the first step, in the order the random streams are drawn: seeds, the data
    placed where the loop reads it, the model (fresh, checked on a real batch, started from
    ``init_from``'s weights, wrapped for DDP and compile), optimizer (parameter groups) and loss (with
    the teacher's logits), then the State, fresh or restored from train_state.pt. Logs the run's parameters."""
    import torch

    cuda = device.startswith("cuda")
    # Each rank draws its own dropout masks; the data order comes from the shared shuffle generator.
    seed_everything(config.seed + world.rank)
    if cuda:
        torch.backends.cudnn.benchmark = not config.deterministic  # autotuned conv kernels for fixed shapes
        torch.backends.cudnn.deterministic = config.deterministic
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores (10-bit mantissa)
        torch.backends.cudnn.allow_tf32 = True

    # ---- data
    data = dataset.load(rundir.data, rundir.dataset)
    info = data.info
    try:
        task = models.resolve_task(family, info.get("task", "classification"))
    except models.TaskError as e:
        raise StageError(str(e)) from None
    x_train, y_train = data.split("train")
    x_val, y_val = data.split("val")
    labels = list(info.get("label_names") or info.get("target_names") or [])
    image = x_train.ndim == 4
    if config.augment_shift:
        if x_train.ndim not in (3, 4):
            raise StageError(f"train.augment_shift needs images (N, C, H, W) or signals (N, C, L); this dataset's "
                             f"inputs are {x_train.shape[1:]}: set train.augment_shift=0")
        if config.augment_shift >= min(x_train.shape[2:]):
            raise StageError(f"train.augment_shift ({config.augment_shift}) must be smaller than the inputs' "
                             f"{tuple(x_train.shape[2:])}: lower it")
    resident = _resident(config.data_path, device, x_train.nbytes + y_train.nbytes + x_val.nbytes)
    # channels_last (NHWC): cuDNN's convolution kernels run without layout transposes.
    channels_last = image and (config.channels_last == "on" or (config.channels_last == "auto" and cuda))
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    precision, autocast = _precision(config.precision, cuda)
    if config.batch_size % world.size:
        raise StageError(f"train.batch_size ({config.batch_size}) must be divisible by the {world.size} "
                         "processes torchrun started")
    split = _place_data(config, (x_train, y_train, x_val, y_val), resident, device, memory_format,
                        config.batch_size // world.size)

    # ---- model, optimizer, loss
    input_shape = tuple(info["input_shape"])
    # classes (classification), targets (regression); the VAE ignores it (its latent size is its own)
    num_outputs = {"classification": int(info.get("num_classes", 0)),
                   "regression": int(y_train.shape[1]) if y_train.ndim == 2 else 1}.get(task, 0)
    model = _build_checked(family, model_config, input_shape, num_outputs, task, x_train)
    head = _head(config.finetune, model, init_from)
    if init_from is not None and not resume:  # a resumed run's weights come from train_state.pt
        _start_from(model, init_from, head, config.finetune.strict, labels, world, rundir, tracker)
    elif world.is_main and not resume:
        rundir.weights_report.unlink(missing_ok=True)  # a previous run's report would describe other weights
    model, step_model = _place_model(config, model, device, memory_format, world)
    backbone = tuple(p for n, p in model.named_parameters()
                     if config.finetune.freeze_epochs and p.requires_grad and not n.startswith(head + "."))
    groups = optim.param_groups(model, head, config.finetune.backbone_lr_scale)  # the backbone's rate is scaled
    opt = optim.build_optimizer(config.optimizer, groups, config, fused=cuda)  # one update kernel on CUDA
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")  # fp16 only: bf16 needs no scaling
    primary = _primary_metric(task)
    monitor = primary if config.early_stopping.metric == "auto" else config.early_stopping.metric
    plateau = (optim.Plateau(config.gamma, config.plateau_patience, "min" if _lower_is_better(monitor) else "max")
               if config.schedule == "plateau" else None)
    soft_targets, teacher_model = None, None
    if teacher is not None:
        teacher_model = _load_teacher(teacher, task, labels, info, input_shape, device, memory_format)
        if not config.augment_shift:  # frozen teacher, fixed inputs: its logits once, not per step
            soft_targets = _predict(teacher_model, split.x_train, device, memory_format, autocast)
            teacher_model = None

    description = models.describe(family, model_config, input_shape, num_outputs, task)
    s = Setup(
        config=config, world=world, device=device, task=task, labels=labels, data=split, precision=precision,
        channels_last=channels_last, memory_format=memory_format, autocast=autocast, model=model,
        step_model=step_model, opt=opt, scaler=scaler, plateau=plateau,
        loss_fn=_loss_fn(config, task, soft_targets, teacher_model, autocast), primary=primary, monitor=monitor,
        checkpoint_meta={
            "model": description,
            "task": task,
            "label_names": list(info.get("label_names") or []),
            **({"target_names": info["target_names"]} if "target_names" in info else {}),
            "input_layout": info.get("input_layout", "NCHW"),
            "normalization": info["normalization"],
            "dataset_sha256": info["sha256"],
            "dataset_source": info["source"],
            "recipe": recipe or {},
            "run_id": tracker.run_id,
            "train_device": device,
            "init_from": str(init_from or ""),
            "distilled_from": str(teacher or ""),
        },
        fingerprint={**_fingerprint(config, description, info), "device_type": split.shuffle.device.type,
                     "resident": resident},
        head=head, backbone=backbone)
    state = _resume(s, rundir.train_state, tracker) if resume else State.fresh(primary)

    n_params = sum(p.numel() for p in model.parameters())
    tracker.log_params({**asdict(config), "device": device, "data_path": "device" if resident else "loader",
                        "precision": precision, "channels_last": channels_last, "world_size": world.size,
                        "model.family": family, "model.parameters": n_params, "task": task,
                        "init_from": str(init_from or ""), "teacher": str(teacher or ""),
                        **{f"model.{k}": v for k, v in asdict(model_config).items()}})
    log.info("training %s (%d parameters, %s) on %s%s for %d epochs: %s data, %s, batch %d%s",
             family, n_params, task, device, f" x{world.size} processes" if world.distributed else "", config.epochs,
             "resident" if resident else f"DataLoader ({config.loader_workers} workers)", precision,
             config.batch_size, ", channels_last" if channels_last else "")
    return s, state


def _precision(choice: str, cuda: bool) -> tuple[str, Callable[[], Any]]:
    """-> (fp32, bf16 or fp16; a factory of autocast contexts for it)."""
    import torch

    if choice != "auto":
        precision = choice
    elif cuda:  # bf16 where the GPU has it (Ampere and later), fp16 with loss scaling on older ones
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    else:
        precision = "fp32"
    if precision == "fp16" and not cuda:
        raise StageError("train.precision=fp16 needs CUDA; use bf16 or fp32 on CPU")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def autocast():
        return torch.autocast(device_type="cuda" if cuda else "cpu", dtype=amp_dtype, enabled=amp_dtype is not None)

    return precision, autocast


def _place_data(config: Config, arrays, resident: bool, device: str, memory_format, per_rank_batch: int) -> Split:
    """The numpy splits as tensors: all on the device when ``resident``, else training data on the host
    behind a DataLoader with pinned memory and workers."""
    import torch

    x_train_np, y_train_np, x_val_np, y_val_np = arrays
    where = device if resident else "cpu"
    x_train = torch.from_numpy(x_train_np).to(where).contiguous(memory_format=memory_format)
    y_train = torch.from_numpy(y_train_np).to(where)
    x_val, y_val = torch.from_numpy(x_val_np), torch.from_numpy(y_val_np)
    if resident:
        x_val, y_val = x_val.to(device), y_val.to(device)
    # Shuffling draws from its own generator, on the device for resident data (randperm on the GPU).
    shuffle = torch.Generator(device=device if resident else "cpu").manual_seed(config.seed)
    if resident:
        return Split(x_train, y_train, x_val, y_val, True, device, per_rank_batch, shuffle)
    sampler = _Order()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x_train, y_train, torch.arange(len(x_train))),
        batch_size=per_rank_batch, sampler=sampler, num_workers=config.loader_workers,
        pin_memory=device.startswith("cuda"),  # page-locked host memory: asynchronous copies to the GPU
        persistent_workers=config.loader_workers > 0,
        # Its own generator: otherwise each epoch's iterator draws a worker seed from the global
        # stream and shifts every dropout mask after it (the loader and resident paths would differ).
        generator=torch.Generator().manual_seed(config.seed))
    return Split(x_train, y_train, x_val, y_val, False, device, per_rank_batch, shuffle, loader, sampler)


def _build_checked(family: str, model_config: Any, input_shape: tuple, num_outputs: int, task: str, x_train):
    """A fresh model, checked on a few real training samples: its outputs must fit the task (a factory
    giving logits of the wrong width fails here, before any training, with one error naming it)."""
    import torch

    try:
        model = models.build(family, model_config, input_shape, num_outputs, task)
        models.check_outputs(family, model_config, model, torch.from_numpy(x_train[:8]), task, num_outputs)
    except models.FactoryError as e:
        raise InputError(str(e)) from None
    return model


def _head(fine: Finetune, model, weights: Path | None) -> str:
    """The output layer's module name when fine-tuning tells it apart from the backbone (weights to
    start from, a scaled backbone rate, a named head); "" otherwise."""
    if fine.freeze_epochs and weights is None:
        raise InputError("train.finetune.freeze_epochs freezes a pretrained backbone, but no weights are given: "
                         "set train.finetune.weights (or pass --init-from), or set train.finetune.freeze_epochs=0")
    if weights is None and fine.backbone_lr_scale == 1.0 and fine.head == "auto":
        return ""
    name = models.output_layer(model) if fine.head == "auto" else fine.head
    module = dict(model.named_modules()).get(name)
    if module is None or not any(True for _ in module.parameters()):
        raise InputError(f"train.finetune.head `{name}` is not a module with parameters in this model (its top-level "
                         f"modules: {', '.join(n for n, _ in model.named_children())}); name its output layer, "
                         f"e.g. {models.output_layer(model)}")
    return name


def _start_from(model, path: Path, head: str, strict: bool, labels: list[str], world: distributed.World,
                rundir: "RunDir", tracker: "Tracker") -> None:
    """Load the weights to fine-tune from; report tensor by tensor what was loaded, skipped (shape
    mismatch), missing or new in the head: in the log, weights_report.json and the tracker."""
    try:
        report = checkpoint.load_weights(model, path, head=head, strict=strict, labels=labels)
    except StageError as e:
        raise InputError(str(e)) from None
    for line in report.lines():
        log.info("%s", line)
    if world.is_main:
        write_json(rundir.weights_report, report.to_dict())
        tracker.log_params({"weights.source": str(path), "weights.format": report.format,
                            **{f"weights.{k}": v for k, v in report.counts().items()}})
        tracker.log_artifact(rundir.weights_report)


def _place_model(config: Config, model, device: str, memory_format, world: distributed.World):
    """-> (the model on the device, what a step calls: wrapped for DDP and compiled where asked)."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    model = model.to(device, memory_format=memory_format)
    train_model = model
    if world.distributed:
        # A frozen backbone takes no gradients; DDP must not wait for them (they stay None on every rank).
        train_model = DistributedDataParallel(model, device_ids=[device] if device.startswith("cuda") else None,
                                              find_unused_parameters=config.finetune.freeze_epochs > 0)
    # torch.compile: fused kernels, fewer Python round trips; pays off on long runs only (tens of seconds to compile).
    return model, torch.compile(train_model) if config.compile else train_model


def _resume(s: Setup, path: Path, tracker: "Tracker") -> State:
    """Restore the model, optimizer, scaler, plateau and every random stream from ``path``; the
    resumed run logs the whole curve so far, not only its own epochs."""
    saved = checkpoint.load_state(path)
    _check_resumable(saved, s.fingerprint, path)
    s.model.load_state_dict(saved["model"])
    s.opt.load_state_dict(saved["optimizer"])
    s.scaler.load_state_dict(saved["scaler"])
    if s.plateau is not None:
        s.plateau.load_state_dict(saved["plateau"])
    rng = saved["rng"]
    checkpoint.set_rng_state(rng[s.world.rank] if len(rng) == s.world.size else rng[0], s.data.shuffle)
    state = State(saved["epoch"], saved["best"], saved["early_stop"], list(saved["history"]), resumed=True)
    prior_run = saved.get("run_id")
    log.info("resuming at epoch %d/%d from %s (run %s)", state.start_epoch + 1, s.config.epochs, path,
             prior_run or "untracked")
    tracker.set_tags({"train.resumed_from_run": prior_run or "", "train.resumed_from_epoch": state.start_epoch})
    for row in state.history:
        tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])
    if saved.get("finished"):  # nothing left to train: the stage only writes its outputs again
        state.start_epoch = s.config.epochs
    return state


# ---------------------------------------------------------------- the loop

def loop(s: Setup, state: State, rundir: "RunDir", tracker: "Tracker") -> int:
    """The epochs, top to bottom. Per step: set the learning rate, forward under autocast, loss,
    backward, clip, optimizer step. Per epoch: validate, log, keep the best (or last) checkpoint, save
    the resumable state, stop early. Returns the samples trained on (all processes)."""
    import torch

    c, world = s.config, s.world
    steps_per_epoch = math.ceil(math.ceil(len(s.data.x_train) / world.size) / s.data.per_rank_batch)
    show_bar = world.is_main and sys.stderr.isatty()
    samples_seen = 0
    for epoch in range(state.start_epoch, c.epochs):
        if state.stopped_early:
            break
        # Fine-tuning: the backbone stays frozen for the first finetune.freeze_epochs epochs, then learns.
        _train_mode(s, frozen_backbone=epoch < c.finetune.freeze_epochs)
        order, batches = s.data.epoch(world)
        # Sums on the device, read once per epoch: no host-device synchronization per step.
        sums = _Sums(s.device)
        with _progress(show_bar, f"epoch {epoch + 1}/{c.epochs}", len(order)) as advance:
            for step, (idx, xb, yb) in enumerate(batches):
                lr = optim.lr_at(c, epoch + step / steps_per_epoch, s.plateau)
                for group in s.opt.param_groups:  # fine-tuning's backbone group runs at a fraction of it
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                if c.augment_shift:
                    xb = _random_shift(xb, c.augment_shift, s.data.shuffle, c.augment_wrap)
                xb = xb.contiguous(memory_format=s.memory_format)
                targets = xb if s.task == "vae" else yb
                with s.autocast():
                    outputs = s.step_model(xb)
                    loss, parts = s.loss_fn(outputs, targets, idx, xb)
                s.opt.zero_grad(set_to_none=True)
                s.scaler.scale(loss).backward()
                if c.grad_clip:
                    s.scaler.unscale_(s.opt)
                    torch.nn.utils.clip_grad_norm_(s.model.parameters(), c.grad_clip)
                s.scaler.step(s.opt)
                s.scaler.update()
                sums.add(loss, parts, len(xb), (outputs.argmax(1) == yb).sum() if s.task == "classification" else None)
                advance(len(xb))
        row, n = sums.read(len(order), s.task, world)
        samples_seen += n
        if not math.isfinite(row["train_loss"]):
            raise StageError(f"training diverged at epoch {epoch + 1} (train loss {row['train_loss']}); "
                             "lower train.lr or set train.grad_clip (e.g. 1.0)")

        distributed.sync_buffers(s.model, world)
        row.update(_validate(s))
        row["lr"] = lr
        if s.monitor not in row:
            raise StageError(f"train.early_stopping.metric `{s.monitor}` is not a validation metric of this "
                             f"{s.task} run; choose one of {sorted(k for k in row if k.startswith('val_'))} or auto")
        state.history.append({"epoch": epoch + 1, **row})
        tracker.log_metrics(row, step=epoch + 1)
        log.info("epoch %3d/%d  lr %.2e  %s", epoch + 1, c.epochs, lr,
                 "  ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "lr"))

        # Reduce-on-plateau and early stopping watch the monitored metric.
        if s.plateau is not None:
            s.plateau.update(row[s.monitor])
        state.early_stop = _early_stop(state.early_stop, row[s.monitor], c.early_stopping, s.monitor)
        # Stop when the tracker asks (a tuner pruning a hopeless trial: pipeline tune), as early stopping does.
        if not state.stopped_early and tracker.should_stop(epoch + 1, row):
            log.info("stopping at epoch %d: the tracker asked to (a tuner pruned this trial)", epoch + 1)
            state.early_stop = {**state.early_stop, "stopped": True}

        last = epoch + 1 == c.epochs or state.stopped_early
        kept = last if c.keep == "last" else _better(row, state.best, s.primary)
        if kept:
            state.best = {"epoch": epoch + 1, "value": row[s.primary], "val_loss": row["val_loss"]}
            if world.is_main:
                scores = {"epoch": epoch + 1, s.primary: row[s.primary], "val_loss": row["val_loss"]}
                checkpoint.save(rundir.checkpoint, s.model, {**s.checkpoint_meta, **scores},
                                json_path=rundir.checkpoint_json)
        if (epoch + 1) % c.checkpoint_every == 0 or last:
            _save_state(s, state, epoch + 1, last, rundir, tracker)
    return samples_seen


def _finish(s: Setup, state: State, rundir: "RunDir", tracker: "Tracker", *, seconds: float,
            samples_seen: int) -> Result:
    """Write the history and curves, log the artifacts and the run's summary metrics."""
    best = state.best
    if best["epoch"] == 0:
        raise StageError(f"{rundir.train_state} says the run had finished but recorded no best epoch; "
                         "train again without --resume")
    if s.world.is_main:
        write_json(rundir.history, state.history)
        plot_history(state.history, rundir.training_curves, metric=s.primary[len("val_"):])
        tracker.log_artifact(rundir.training_curves)
        tracker.log_artifact(rundir.checkpoint_json)
        tracker.log_artifact(rundir.checkpoint)
    samples_per_s = samples_seen / seconds if seconds > 0 and samples_seen else 0.0
    tracker.log_metrics({"best_epoch": best["epoch"], f"best_{s.primary}": best["value"], "train_seconds": seconds,
                         "train_samples_per_s": samples_per_s, "epochs_run": len(state.history)})
    tracker.set_tags({"device": s.device, "stopped_early": state.stopped_early})
    return Result(best_epoch=best["epoch"], metric=s.primary, value=best["value"], val_loss=best["val_loss"],
                  epochs_run=len(state.history), stopped_early=state.stopped_early, device=s.device,
                  data_path="device" if s.data.resident else "loader", precision=s.precision, seconds=seconds,
                  samples_per_s=samples_per_s, run_id=tracker.run_id,
                  resumed_from_epoch=state.start_epoch if state.resumed else 0)


# ---------------------------------------------------------------- helpers of the loop

class _Sums:
    """One epoch's training loss (and its parts) and correct predictions, summed on the device over
    the samples of each step; ``read`` all-reduces them over the processes, once per epoch."""

    def __init__(self, device: str):
        import torch

        self.loss = torch.zeros((), device=device, dtype=torch.float64)
        self.correct = torch.zeros((), device=device, dtype=torch.int64)
        self.parts: dict[str, Any] = {}
        self.device = device

    def add(self, loss, parts: dict, n: int, correct=None) -> None:
        self.loss += loss.detach().double() * n
        for k, v in parts.items():
            self.parts[k] = self.parts.get(k, 0) + v.double() * n
        if correct is not None:
            self.correct += correct

    def read(self, n_local: int, task: str, world: distributed.World) -> tuple[dict, int]:
        """-> (the epoch's train_* metrics, samples seen by all processes)."""
        import torch

        n_seen = torch.tensor(float(n_local), device=self.device, dtype=torch.float64)
        names = sorted(self.parts) if len(self.parts) > 1 else []  # the VAE's reconstruction and KL terms
        sums = distributed.all_sum(torch.stack([n_seen, self.loss, self.correct.double(),
                                                *(self.parts[k] for k in names)]), world).tolist()
        row = {"train_loss": sums[1] / sums[0]}
        if task == "classification":
            row["train_accuracy"] = sums[2] / sums[0]
        row.update({f"train_{k}": v / sums[0] for k, v in zip(names, sums[3:])})
        return row, int(sums[0])


def _train_mode(s: Setup, frozen_backbone: bool) -> None:
    """Training mode for one epoch. While the backbone is frozen its parameters take no gradients (no
    update, no weight decay) and its normalization layers keep their running statistics (eval mode):
    only the head learns. Says so when the backbone freezes or thaws."""
    s.model.train()
    if not s.backbone:
        return
    if s.backbone[0].requires_grad == frozen_backbone:
        log.info("%s the backbone (%d tensors); the head `%s` %s", "freezing" if frozen_backbone else "unfreezing",
                 len(s.backbone), s.head, "trains alone" if frozen_backbone else "and the backbone train together")
    for p in s.backbone:
        p.requires_grad_(not frozen_backbone)
    if frozen_backbone:
        for name, module in s.model.named_modules():
            if getattr(module, "running_mean", None) is not None and not name.startswith(s.head + "."):
                module.eval()


def _better(row: dict, best: dict, primary: str) -> bool:
    """Better on the primary validation metric; ties go to the lower validation loss."""
    sign = -1 if _lower_is_better(primary) else 1
    return (sign * row[primary], -row["val_loss"]) > (sign * best["value"], -best["val_loss"])


def _early_stop(stop: dict, value: float, rule: EarlyStopping, metric: str) -> dict:
    """Early stopping's counters after one more epoch's ``value`` of ``metric``: an improvement by more
    than ``min_delta`` resets them; ``patience`` epochs without one stop the run."""
    if stop["best"] is None:
        improved = True
    elif _lower_is_better(metric):
        improved = value < stop["best"] - rule.min_delta
    else:
        improved = value > stop["best"] + rule.min_delta
    stop = {"best": value if improved else stop["best"], "bad_epochs": 0 if improved else stop["bad_epochs"] + 1}
    stop["stopped"] = bool(rule.patience) and stop["bad_epochs"] >= rule.patience
    if stop["stopped"]:
        log.info("early stop: %s has not improved by more than %g for %d epochs", metric, rule.min_delta,
                 stop["bad_epochs"])
    return stop


def _save_state(s: Setup, state: State, epoch: int, finished: bool, rundir: "RunDir", tracker: "Tracker") -> None:
    """train_state.pt: what ``--resume`` needs to continue exactly (every rank's random streams)."""
    rng = distributed.gather(checkpoint.rng_state(s.data.shuffle), s.world)  # collective: every rank calls it
    if s.world.is_main:
        checkpoint.save_state(rundir.train_state, {
            "epoch": epoch, "finished": finished, "fingerprint": s.fingerprint, "run_id": tracker.run_id,
            "model": {k: v.detach().cpu() for k, v in s.model.state_dict().items()},
            "optimizer": s.opt.state_dict(), "scaler": s.scaler.state_dict(),
            "plateau": s.plateau.state_dict() if s.plateau is not None else None,
            "rng": rng, "best": state.best, "early_stop": state.early_stop, "history": state.history})


def _resident(choice: str, device: str, nbytes: int) -> bool:
    """Keep the split on the device? On CPU it is in memory already; on CUDA when it fits comfortably."""
    if choice != "auto":
        return choice == "device"
    if not device.startswith("cuda"):
        return True
    import torch

    free, _ = torch.cuda.mem_get_info(device)
    fits = nbytes < RESIDENT_FRACTION * free
    if not fits:
        log.info("the split (%.0f MiB) exceeds %.0f%% of free GPU memory (%.0f MiB): using a DataLoader",
                 nbytes / 2**20, RESIDENT_FRACTION * 100, free / 2**20)
    return fits


class _Order:
    """The DataLoader's sampler: this epoch's (sharded) permutation, set by the loop before each epoch.
    Sampling runs in the main process, so persistent workers see the new order too."""

    order: list[int] = []

    def __iter__(self):
        return iter(self.order)

    def __len__(self):
        return len(self.order)


def _primary_metric(task: str) -> str:
    return f"val_{PRIMARY[task][0]}"  # val_accuracy, val_r2, val_reconstruction_mse


def _lower_is_better(metric: str) -> bool:
    return metric.endswith(("loss", "mse", "mae", "kl"))


def _loss_fn(config: Config, task: str, soft_targets, teacher_model, autocast):
    """loss(outputs, targets, idx, inputs) -> (loss, parts as device tensors): the task's loss
    (stages/losses.py), or Hinton's distillation loss
    alpha * T^2 * KL(teacher/T || student/T) + (1 - alpha) * cross-entropy when a teacher is given."""
    import torch
    import torch.nn.functional as F

    if soft_targets is None and teacher_model is None:
        return lambda outputs, targets, idx, inputs: compute_loss(
            task, outputs, targets, label_smoothing=config.label_smoothing, kl_weight=config.kl_weight, sync=False)
    T, alpha = config.distill.temperature, config.distill.alpha

    def loss(outputs, targets, idx, inputs):
        if soft_targets is not None:
            teacher_logits = soft_targets[idx]
        else:
            with torch.no_grad():
                teacher_logits = teacher_model(inputs).float()
        soft = F.kl_div(F.log_softmax(outputs.float() / T, dim=1), F.log_softmax(teacher_logits / T, dim=1),
                        reduction="batchmean", log_target=True) * (T * T)
        hard, _ = compute_loss(task, outputs, targets, label_smoothing=config.label_smoothing, sync=False)
        return alpha * soft + (1.0 - alpha) * hard, {"soft": soft.detach(), "hard": hard.detach()}

    return loss


def _predict(model, x, device: str, memory_format, autocast):
    """Outputs of ``model`` (eval mode) over ``x`` in chunks, in float32 on the device."""
    import torch

    outs = []
    with torch.inference_mode(), autocast():
        for i in range(0, len(x), EVAL_CHUNK):
            xb = x[i:i + EVAL_CHUNK].to(device, non_blocking=True).contiguous(memory_format=memory_format)
            out = model(xb)
            outs.append(tuple(o.float() for o in out) if isinstance(out, (tuple, list)) else out.float())
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outs))
    return torch.cat(outs)


def _validate(s: Setup) -> dict:
    """Validation loss (no label smoothing: comparable across recipes) and the task's metrics
    (stages/metrics.py ``score``: the scalar ones, prefixed val_)."""
    s.model.eval()
    outputs = _predict(s.model, s.data.x_val, s.device, s.memory_format, s.autocast)
    targets = (s.data.x_val if s.task == "vae" else s.data.y_val).to(s.device)
    loss, _ = compute_loss(s.task, outputs, targets, kl_weight=s.config.kl_weight)
    as_numpy = tuple(o.cpu().numpy() for o in outputs) if isinstance(outputs, tuple) else outputs.cpu().numpy()
    scores = score(s.task, targets.cpu().numpy(), as_numpy, s.labels)
    return {"val_loss": float(loss), **{f"val_{k}": float(v) for k, v in scores.items()
                                         if isinstance(v, float) and k != "samples"}}


def _random_shift(x, k: int, generator, wrap: bool = False):
    """Shift each image (N, C, H, W) by a random (dy, dx), or each signal (N, C, L) by a random d, in [-k, k],
    on x's device: edges replicated, or (wrap) a circular shift."""
    import torch
    import torch.nn.functional as F

    n, c, *spatial = x.shape
    offsets = torch.randint(0, 2 * k + 1, (len(spatial), n), generator=generator, device=generator.device).to(x.device)
    batch = torch.arange(n, device=x.device)
    channel = torch.arange(c, device=x.device)
    if len(spatial) == 1:  # signals
        (length,) = spatial
        steps = offsets[0][:, None] + torch.arange(length, device=x.device)  # (n, L), into the padded signal
        if wrap:
            return x[batch[:, None, None], channel[None, :, None], ((steps - k) % length)[:, None, :]]
        padded = F.pad(x, (k, k), mode="replicate")
        return padded[batch[:, None, None], channel[None, :, None], steps[:, None, :]]
    h, w = spatial
    rows = offsets[0][:, None] + torch.arange(h, device=x.device)  # (n, h)
    cols = offsets[1][:, None] + torch.arange(w, device=x.device)  # (n, w)
    if wrap:
        return x[batch[:, None, None, None], channel[None, :, None, None],
                 ((rows - k) % h)[:, None, :, None], ((cols - k) % w)[:, None, None, :]]
    padded = F.pad(x, (k, k, k, k), mode="replicate")
    return padded[batch[:, None, None, None], channel[None, :, None, None], rows[:, None, :, None], cols[:, None, None, :]]


def _load_teacher(path: Path, task: str, labels: list[str], info: dict, input_shape, device: str, memory_format):
    if task != "classification":
        raise StageError(f"distillation needs a classification task; this run's task is {task}: "
                         "remove train.distill.teacher")
    teacher, meta = checkpoint.load(path)
    if list(meta.get("label_names", [])) != labels:
        raise StageError(f"the teacher {path} predicts labels {meta.get('label_names')}, this dataset has "
                         f"{labels}: distill from a teacher trained on the same dataset")
    if tuple(meta["model"]["input_shape"]) != tuple(input_shape):
        raise StageError(f"the teacher {path} takes inputs {tuple(meta['model']['input_shape'])}, this dataset "
                         f"has {tuple(input_shape)}: distill from a teacher trained on the same dataset")
    if meta.get("dataset_sha256") != info["sha256"]:
        log.warning("the teacher %s was trained on dataset %s, this run's is %s: if its training split holds this "
                    "run's validation or test samples, the student's scores are optimistic", path,
                    str(meta.get("dataset_sha256"))[:8], info["sha256"][:8])
    n = sum(p.numel() for p in teacher.parameters())
    log.info("distilling from %s (%s, %d parameters, epoch %s)", path, meta["model"]["family"], n, meta.get("epoch"))
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.to(device, memory_format=memory_format).eval()


def _fingerprint(config: Config, description: dict, info: dict) -> dict:
    """What must not change between a run and its resumption."""
    return {"train": {k: v for k, v in asdict(config).items() if k not in RESUMABLE_CHANGES},
            "model": description, "dataset_sha256": info["sha256"]}


def _check_resumable(state: dict, fingerprint: dict, path: Path) -> None:
    old = state.get("fingerprint", {})
    diffs = []
    for key in ("model", "dataset_sha256", "device_type", "resident"):
        if old.get(key) != fingerprint[key]:
            diffs.append(key)
    old_train, new_train = old.get("train", {}), fingerprint["train"]
    diffs += [f"train.{k} ({old_train.get(k)!r} -> {new_train.get(k)!r})"
              for k in sorted(set(old_train) | set(new_train)) if old_train.get(k) != new_train.get(k)]
    if diffs:
        raise StageError(f"cannot resume from {path}: the recipe or data changed since it was written "
                         f"({'; '.join(diffs)}); resume with the same recipe or train again without --resume")


@contextlib.contextmanager
def _progress(show: bool, description: str, total: int):
    """A rich progress bar for one epoch in a terminal; nothing otherwise (the epoch's log line follows)."""
    if not show:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
