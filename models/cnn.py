"""A small 2-D CNN classifier for image inputs laid out as (N, C, H, W)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Config:
    channels: tuple[int, ...] = (32, 64, 64)  # one conv block (3x3 conv, BN, ReLU) per entry
    pool_after: int = 2  # 2x2 max-pool after this many blocks (0: never); 8x8 digits -> 4x4
    hidden: int = 128
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if not self.channels or any(c <= 0 for c in self.channels):
            raise ValueError(f"`channels` must be a non-empty list of positive ints, got {list(self.channels)}")
        if not 0 <= self.pool_after <= len(self.channels):
            raise ValueError(f"`pool_after` must be between 0 and {len(self.channels)}, got {self.pool_after}")
        if self.hidden <= 0:
            raise ValueError(f"`hidden` must be > 0, got {self.hidden}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {self.dropout}")


class CNN(nn.Module):
    def __init__(self, config: Config, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"cnn needs (C, H, W) inputs, got shape {input_shape}")
        layers: list[nn.Module] = []
        in_ch = input_shape[0]
        for i, out_ch in enumerate(config.channels, start=1):
            layers += [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU()]
            if i == config.pool_after:
                layers.append(nn.MaxPool2d(2))
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        # Global average pooling keeps the head independent of the input's height and width.
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(in_ch, config.hidden),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden, num_classes),
        )

    def forward(self, x):
        return self.head(self.features(x))


def build(config: Config, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return CNN(config, input_shape, num_classes)
