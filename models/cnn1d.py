"""A 1-D CNN classifier for signals laid out as (N, C, L), e.g. MNIST-1D's (N, 1, 40)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Config:
    channels: tuple[int, ...] = (32, 64, 128)  # one conv block (conv, BN, ReLU) per entry
    kernel_size: int = 5  # odd, so "same" padding keeps the length
    pool_every: int = 1  # 2x max-pool after every this many blocks (0: never); 40 -> 20 -> 10 -> 5
    hidden: int = 128
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if not self.channels or any(c <= 0 for c in self.channels):
            raise ValueError(f"`channels` must be a non-empty list of positive ints, got {list(self.channels)}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"`kernel_size` must be a positive odd int, got {self.kernel_size}")
        if not 0 <= self.pool_every <= len(self.channels):
            raise ValueError(f"`pool_every` must be between 0 and {len(self.channels)}, got {self.pool_every}")
        if self.hidden <= 0:
            raise ValueError(f"`hidden` must be > 0, got {self.hidden}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {self.dropout}")


class CNN1d(nn.Module):
    def __init__(self, config: Config, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        if len(input_shape) != 2:
            raise ValueError(f"cnn1d needs (C, L) inputs (layout NCL), got shape {input_shape}")
        in_ch, length = input_shape
        layers: list[nn.Module] = []
        for i, out_ch in enumerate(config.channels, start=1):
            layers += [nn.Conv1d(in_ch, out_ch, config.kernel_size, padding=config.kernel_size // 2, bias=False),
                       nn.BatchNorm1d(out_ch), nn.ReLU()]
            if config.pool_every and i % config.pool_every == 0:
                if length < 2:
                    raise ValueError(f"cnn1d pools the length {input_shape[1]} below 1; raise `pool_every` or use fewer blocks")
                layers.append(nn.MaxPool1d(2))
                length //= 2
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        # Global average pooling: the head does not depend on the signal length.
        self.head = nn.Sequential(nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(in_ch, config.hidden), nn.ReLU(),
                                  nn.Dropout(config.dropout), nn.Linear(config.hidden, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


def build(config: Config, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    return CNN1d(config, input_shape, num_outputs)
