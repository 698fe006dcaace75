"""A multi-layer perceptron; flattens whatever input shape it is given. Its outputs are logits
(classification) or predictions (regression): the architecture is the same, only the loss differs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


@dataclass(frozen=True)
class Config:
    hidden: tuple[int, ...] = (256, 128)
    dropout: float = 0.1
    activation: Literal["relu", "gelu", "tanh"] = "relu"

    def __post_init__(self) -> None:
        if any(h <= 0 for h in self.hidden):
            raise ValueError(f"`hidden` must hold positive ints, got {list(self.hidden)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {self.dropout}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"`activation` must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")


def build(config: Config, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in config.hidden:
        layers += [nn.Linear(width, h), ACTIVATIONS[config.activation](), nn.Dropout(config.dropout)]
        width = h
    layers.append(nn.Linear(width, num_outputs))
    return nn.Sequential(*layers)
