"""A single linear layer over the flattened input: logistic regression for classification (its
outputs are logits; softmax + cross-entropy make it multinomial logistic regression) and linear
regression for regression (its outputs are the predictions, fitted by mean squared error)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Config:
    dropout: float = 0.0  # on the inputs; 0 gives the textbook model
    bias: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {self.dropout}")


def build(config: Config, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    if num_outputs < 1:
        raise ValueError(f"linear needs at least one output, got {num_outputs}")
    layers: list[nn.Module] = [nn.Flatten()]
    if config.dropout:
        layers.append(nn.Dropout(config.dropout))
    layers.append(nn.Linear(math.prod(input_shape), num_outputs, bias=config.bias))
    return nn.Sequential(*layers)
