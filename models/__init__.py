"""Model registry: family name -> builder, config class and export spec.

A model family is one file in this package with an ``nn.Module``, its frozen ``Config`` and an
``ExportSpec``. Nothing here does I/O or training: the stages build models through ``build`` and
rebuild them from a checkpoint's plain-dict description through ``rebuild``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from models import cnn, mlp


@dataclass(frozen=True)
class ExportSpec:
    """How a family appears in ONNX: tensor names and which axes are dynamic."""

    input_name: str = "input"
    output_names: tuple[str, ...] = ("logits",)
    dynamic_batch: bool = True


@dataclass(frozen=True)
class Family:
    name: str
    config_class: type
    builder: Callable[..., nn.Module]
    export: ExportSpec
    description: str


FAMILIES: dict[str, Family] = {
    "cnn": Family("cnn", cnn.Config, cnn.build, ExportSpec(), "2-D convolutional classifier"),
    "mlp": Family("mlp", mlp.Config, mlp.build, ExportSpec(), "multi-layer perceptron classifier"),
}


def family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown model family {name!r}; choose one of {sorted(FAMILIES)}") from None


def build(name: str, config: Any, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build a fresh model. ``input_shape`` excludes the batch axis, e.g. (1, 8, 8)."""
    return family(name).builder(config, tuple(input_shape), int(num_classes))


def describe(name: str, config: Any, input_shape: tuple[int, ...], num_classes: int) -> dict:
    """The plain-dict description a checkpoint stores so the model can be rebuilt without a recipe."""
    return {
        "family": name,
        "config": dataclasses.asdict(config),
        "input_shape": list(input_shape),
        "num_classes": int(num_classes),
    }


def rebuild(description: dict) -> nn.Module:
    """Inverse of ``describe``: a fresh (untrained) model with the described architecture."""
    fam = family(description["family"])
    cfg = fam.config_class(**{k: tuple(v) if isinstance(v, list) else v for k, v in description["config"].items()})
    return fam.builder(cfg, tuple(description["input_shape"]), int(description["num_classes"]))
