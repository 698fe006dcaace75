"""Model registry: family name -> builder, config class, export spec and the tasks it supports.

A model family is one file in this package with its frozen ``Config`` and a ``build`` function (an
``nn.Module`` of its own, or an ``nn.Sequential``), plus its row in ``FAMILIES`` below: the
``ExportSpec``, the tasks and the input layouts. Nothing here does I/O or training: the stages build
models through ``build`` and rebuild them from a checkpoint's plain-dict description through ``rebuild``.

A task is one of ``TASKS``. The run's task comes from the dataset (dataset.json ``task``), except for
families that define their own (the VAE's task is always "vae"); ``resolve_task`` says which, and
``export_spec`` gives the ONNX output names that go with it.

Three families build architectures defined elsewhere (models/custom.py): ``custom`` (the user's own
``model.factory``), ``torchvision`` and ``timm`` (by ``model.arch``; optional packages). They are not
``builtin``: their code is not this package's, so ``code_modules`` names what a fingerprint must hash,
and ``check_outputs`` checks on a real batch that the module fits the task before any training.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from models import cnn, cnn1d, custom, linear, mlp, rnn, transformer, vae
from models.custom import FactoryError  # noqa: F401  (re-exported: models.FactoryError)

TASKS: tuple[str, ...] = ("classification", "regression", "vae")
# Input layouts: images (N, C, H, W), signals (N, C, L), feature vectors (N, F).
LAYOUTS: tuple[str, ...] = ("NCHW", "NCL", "NF")

# What the ONNX outputs are called, per task (the order the module's forward returns them in).
OUTPUT_NAMES: dict[str, tuple[str, ...]] = {
    "classification": ("logits",),
    "regression": ("prediction",),
    "vae": ("reconstruction", "mu", "logvar"),
}


class TaskError(ValueError):
    """A family cannot do the dataset's task; the message names the families that can."""


@dataclass(frozen=True)
class ExportPart:
    """An extra ONNX file exported from a submodule, written as ``<name>.onnx`` beside model.onnx.

    ``input_shape_fn(model, input_shape)`` gives the part's per-sample input shape (no batch axis)
    from the built model and the whole model's per-sample input shape, e.g. the VAE decoder's
    ``(latent_dim,)``. The part's forward returns its outputs in ``output_names`` order.
    """

    name: str
    attribute: str
    input_name: str
    output_names: tuple[str, ...]
    input_shape_fn: Callable[[nn.Module, tuple[int, ...]], tuple[int, ...]]


@dataclass(frozen=True)
class ExportSpec:
    """How a family appears in ONNX: tensor names, which axes are dynamic, extra part files."""

    input_name: str = "input"
    output_names: tuple[str, ...] = ("logits",)
    dynamic_batch: bool = True
    parts: tuple[ExportPart, ...] = ()


@dataclass(frozen=True)
class Family:
    name: str
    config_class: type
    builder: Callable[..., nn.Module]
    export: ExportSpec
    description: str
    tasks: tuple[str, ...] = ("classification",)
    layouts: tuple[str, ...] = LAYOUTS  # input layouts (dataset.json `input_layout`) it accepts
    builtin: bool = True  # False: the architecture is the user's code or an optional library's
    takes_task: bool = False  # the builder takes the run's task too (custom factories may ask for it)


# The VAE: model.onnx is the whole deterministic autoencoder; encoder.onnx and decoder.onnx beside it.
VAE_EXPORT = ExportSpec(output_names=OUTPUT_NAMES["vae"], parts=(
    ExportPart("encoder", "encoder", "input", ("mu", "logvar"), lambda model, input_shape: tuple(input_shape)),
    ExportPart("decoder", "decoder", "latent", ("reconstruction",), lambda model, input_shape: (model.latent_dim,)),
))

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("linear", linear.Config, linear.build, ExportSpec(),
           "logistic regression (classification) / linear regression (regression)",
           ("classification", "regression")),
    Family("mlp", mlp.Config, mlp.build, ExportSpec(), "multi-layer perceptron",
           ("classification", "regression")),
    Family("cnn", cnn.Config, cnn.build, ExportSpec(), "2-D convolutional classifier for (N, C, H, W) images",
           layouts=("NCHW",)),
    Family("cnn1d", cnn1d.Config, cnn1d.build, ExportSpec(), "1-D convolutional classifier for (N, C, L) signals",
           layouts=("NCL",)),
    Family("rnn", rnn.Config, rnn.build, ExportSpec(), "GRU / LSTM sequence classifier (rows of an image as steps)",
           layouts=("NCL", "NCHW")),
    Family("transformer", transformer.Config, transformer.build, ExportSpec(),
           "small Transformer encoder classifier over patches", layouts=("NCL", "NCHW")),
    Family("vae", vae.Config, vae.build, VAE_EXPORT,
           "variational autoencoder (MLP encoder/decoder for any input, conv for images)", ("vae",)),
    Family("custom", custom.Config, custom.build, ExportSpec(),
           "your own nn.Module from `model.factory: package.module:function` with `model.kwargs`",
           custom.TASKS, builtin=False, takes_task=True),
    Family("torchvision", custom.ArchConfig, custom.build_torchvision, ExportSpec(),
           "a torchvision image classifier by `model.arch` (random weights; needs torchvision)",
           layouts=("NCHW",), builtin=False),
    Family("timm", custom.ArchConfig, custom.build_timm, ExportSpec(),
           "a timm image classifier by `model.arch` (random weights; needs timm)", layouts=("NCHW",), builtin=False),
)}


def family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown model family {name!r}; choose one of {sorted(FAMILIES)}") from None


def resolve_task(name: str, dataset_task: str) -> str:
    """The run's task: the family's own when it has exactly one non-dataset task (vae), else the dataset's.

    Raises TaskError when the family cannot learn the dataset's task.
    """
    fam = family(name)
    if fam.tasks == ("vae",):
        return "vae"
    if dataset_task not in fam.tasks:
        able = sorted(f.name for f in FAMILIES.values() if dataset_task in f.tasks)
        raise TaskError(f"model family {name!r} does {', '.join(fam.tasks)}, but the dataset's task is "
                        f"{dataset_task!r}; choose one of {able}")
    return dataset_task


def check_layout(name: str, layout: str) -> None:
    """Raise TaskError when the family cannot read inputs of ``layout``, naming the families that can."""
    fam = family(name)
    if layout not in fam.layouts:
        able = sorted(f.name for f in FAMILIES.values() if layout in f.layouts)
        raise TaskError(f"model family {name!r} reads {', '.join(fam.layouts)} inputs, but the dataset's layout is "
                        f"{layout}; choose one of {able}")


def export_spec(name: str, task: str) -> ExportSpec:
    """The family's export spec with the output names of ``task`` (mlp/linear serve two tasks)."""
    spec = family(name).export
    return dataclasses.replace(spec, output_names=OUTPUT_NAMES[task])


def build(name: str, config: Any, input_shape: tuple[int, ...], num_outputs: int,
          task: str = "classification") -> nn.Module:
    """Build a fresh model. ``input_shape`` excludes the batch axis, e.g. (1, 8, 8).

    ``num_outputs``: classes (classification), targets (regression); the VAE ignores it (its latent
    size is in its config). ``task`` reaches the families that take it (custom factories).
    """
    fam = family(name)
    extra = {"task": task} if fam.takes_task else {}
    return fam.builder(config, tuple(input_shape), int(num_outputs), **extra)


def describe(name: str, config: Any, input_shape: tuple[int, ...], num_outputs: int,
             task: str | None = None) -> dict:
    """The plain-dict description a checkpoint stores so the model can be rebuilt without a recipe."""
    out = {
        "family": name,
        "config": dataclasses.asdict(config),
        "input_shape": list(input_shape),
        "num_outputs": int(num_outputs),
        "num_classes": int(num_outputs),  # the name older checkpoints used; kept for their readers
    }
    if task is not None and family(name).takes_task:  # a custom factory may be built for its task
        out["task"] = task
    return out


def config_from_dict(name: str, values: dict) -> Any:
    """A family's frozen Config from plain values (lists become tuples, as the dataclasses declare)."""
    return family(name).config_class(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def rebuild(description: dict) -> nn.Module:
    """Inverse of ``describe``: a fresh (untrained) model with the described architecture. A custom
    model's description names its factory: rebuilding imports and runs that module."""
    name = description["family"]
    outputs = description.get("num_outputs", description.get("num_classes"))
    return build(name, config_from_dict(name, description["config"]), tuple(description["input_shape"]),
                 int(outputs), description.get("task", "classification"))


def source(name: str, config: Any) -> str:
    """How error messages name the model: its factory or architecture for the non-builtin families."""
    if isinstance(config, custom.Config):
        return f"model.factory `{config.factory}`"
    if isinstance(config, custom.ArchConfig):
        return f"{name} `{config.arch}`"
    return f"model family {name!r}"


def code_modules(name: str, config: Any) -> tuple[str, ...]:
    """Modules of the user's code the model runs (its factory's), which a fingerprint must hash;
    the builtin families' code is this package's, and libraries count by their versions."""
    return (custom.module_name(config.factory),) if isinstance(config, custom.Config) else ()


def check_outputs(name: str, config: Any, model: nn.Module, x: Any, task: str, num_outputs: int) -> None:
    """Run ``model`` (eval mode, no gradients) on ``x``, a few real samples, and raise FactoryError
    unless it returns what ``task`` needs: one float tensor of (N, num_outputs), logits for
    classification, predictions for regression. The VAE's three outputs are its family's own contract."""
    import torch

    if task not in ("classification", "regression"):
        return
    who, batch = source(name, config), len(x)
    what = "logits (N, classes)" if task == "classification" else "predictions (N, targets)"
    model.eval()
    try:
        with torch.no_grad():
            outputs = model(x)
    except Exception as e:
        raise FactoryError(f"{who}: the model fails on a batch of {batch} real samples of shape {tuple(x.shape)} "
                           f"({type(e).__name__}: {str(e)[:300]}); build it for inputs of {tuple(x.shape[1:])} "
                           "(the factory may take `input_shape` / `in_channels`)") from None
    finally:
        model.train()
    if isinstance(outputs, (tuple, list)):
        raise FactoryError(f"{who}: the model returns {len(outputs)} outputs; a {task} model returns one tensor "
                           f"of {what}")
    if not isinstance(outputs, torch.Tensor):
        raise FactoryError(f"{who}: the model returns {type(outputs).__name__}; a {task} model returns one tensor "
                           f"of {what}")
    want = (batch, int(num_outputs))
    if tuple(outputs.shape) != want:
        width = "classes" if task == "classification" else "targets"
        raise FactoryError(f"{who}: on a batch of {batch} real samples the model returns shape "
                           f"{tuple(outputs.shape)}, but this {task} dataset needs {want} ({num_outputs} {width}); "
                           f"size its output layer from the dataset: a factory parameter named "
                           f"`{'num_classes' if task == 'classification' else 'num_targets'}` (or `num_outputs`) receives it")
    if not outputs.is_floating_point():
        raise FactoryError(f"{who}: the model returns {outputs.dtype}; {what} must be floating point")


def output_layer(model: nn.Module) -> str:
    """Qualified name of the layer that produces the outputs (the "head" that ``num_outputs`` sizes),
    which fine-tuning replaces when the label count changes.

    A family names it with an ``output_layer`` attribute on its module (a custom model may too); a timm
    model names it in its ``pretrained_cfg["classifier"]``; otherwise it is the last submodule that holds
    parameters (the final ``nn.Linear`` of cnn, mlp and linear, torchvision's ``fc`` / ``classifier.N``).
    """
    named = getattr(model, "output_layer", None)
    if isinstance(named, str):
        return named
    timm_head = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if isinstance(timm_head, str):
        return timm_head
    last = None
    for name, module in model.named_modules():
        if name and any(True for _ in module.parameters(recurse=False)):
            last = name
    if last is None:
        raise ValueError(f"{type(model).__name__} has no layer with parameters to act as its output layer")
    return last
