"""A multi-layer perceptron classifier; flattens whatever input shape it is given."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Config:
    hidden: tuple[int, ...] = (256, 128)
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if any(h <= 0 for h in self.hidden):
            raise ValueError(f"`hidden` must hold positive ints, got {list(self.hidden)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {self.dropout}")


def build(config: Config, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in config.hidden:
        layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(config.dropout)]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
