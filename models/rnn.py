"""A GRU or LSTM sequence classifier.

Signals (C, L) are read as L / step_size steps of C * step_size features (consecutive values grouped:
shorter sequences train faster and carry gradients further); images (C, H, W) as H rows of C*W
features. The sequence summary is the last step's hidden state (both directions' final states when
bidirectional) or the mean over steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


@dataclass(frozen=True)
class Config:
    cell: Literal["gru", "lstm"] = "gru"
    hidden: int = 128
    layers: int = 1
    bidirectional: bool = False
    pooling: Literal["last", "mean"] = "last"
    dropout: float = 0.0  # between stacked layers and before the head
    step_size: int = 1  # signals: consecutive values read as one step

    def __post_init__(self) -> None:
        if self.cell not in ("gru", "lstm"):
            raise ValueError(f"`cell` must be gru or lstm, got {self.cell!r}")
        if self.hidden <= 0:
            raise ValueError(f"`hidden` must be > 0, got {self.hidden}")
        if self.layers < 1:
            raise ValueError(f"`layers` must be >= 1, got {self.layers}")
        if self.pooling not in ("last", "mean"):
            raise ValueError(f"`pooling` must be last or mean, got {self.pooling!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {self.dropout}")
        if self.step_size < 1:
            raise ValueError(f"`step_size` must be >= 1, got {self.step_size}")


class SequenceClassifier(nn.Module):
    def __init__(self, config: Config, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        if len(input_shape) not in (2, 3):
            raise ValueError(f"rnn needs (C, L) signals or (C, H, W) images, got shape {input_shape}")
        if len(input_shape) == 2 and input_shape[1] % config.step_size:
            raise ValueError(f"rnn: signal length {input_shape[1]} is not a multiple of `step_size` {config.step_size}")
        self.step_size = config.step_size if len(input_shape) == 2 else 1
        features = input_shape[0] * self.step_size if len(input_shape) == 2 else input_shape[0] * input_shape[2]
        cell = nn.GRU if config.cell == "gru" else nn.LSTM
        self.rnn = cell(features, config.hidden, num_layers=config.layers, batch_first=True,
                        bidirectional=config.bidirectional, dropout=config.dropout if config.layers > 1 else 0.0)
        self.pooling = config.pooling
        width = config.hidden * (2 if config.bidirectional else 1)
        self.head = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(width, num_classes))

    def forward(self, x):
        if x.dim() == 4:  # (N, C, H, W) -> (N, H, C*W): one row per step
            x = x.permute(0, 2, 1, 3).flatten(2)
        else:  # (N, C, L) -> (N, L / k, k * C): k consecutive values per step
            x = x.transpose(1, 2)
            if self.step_size > 1:
                x = x.reshape(x.shape[0], -1, x.shape[2] * self.step_size)
        out, _ = self.rnn(x)  # (N, steps, hidden * directions)
        if self.pooling == "mean":
            summary = out.mean(dim=1)
        elif self.rnn.bidirectional:
            # The forward direction has read the whole sequence at the last step, the backward one at the first.
            half = self.rnn.hidden_size
            summary = torch.cat([out[:, -1, :half], out[:, 0, half:]], dim=1)
        else:
            summary = out[:, -1]
        return self.head(summary)


def build(config: Config, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    return SequenceClassifier(config, input_shape, num_outputs)
