"""An example of `model.family: custom`: a small residual CNN in plain PyTorch, built by `build`.

The recipe names the factory and its keyword arguments (configs/digits-custom.yaml):

    model:
      family: custom
      factory: examples.custom_model.resnet:build
      kwargs: {width: 32, blocks: 2}

The pipeline imports this module from the directory it runs in and calls ``build`` with the recipe's
``kwargs`` plus the dataset's facts it asks for by parameter name (here ``input_shape`` and
``num_classes``; ``in_channels``, ``in_features``, ``image_size``, ``num_outputs``, ``num_targets`` and
``task`` are offered too), then trains, checkpoints, exports and serves the module like a built-in
one. From ``input_shape`` it builds 2-D convolutions for images (C, H, W) and 1-D ones for signals
(C, L), so the same factory serves the digits and MNIST-1D. Editing this file reruns `train`.
"""

from __future__ import annotations

from torch import nn


class ResidualBlock(nn.Module):
    """Two 3-wide convolutions with batch norm, added to the input (He et al. 2016)."""

    def __init__(self, channels: int, conv: type, norm: type):
        super().__init__()
        self.body = nn.Sequential(conv(channels, channels, 3, padding=1, bias=False), norm(channels), nn.ReLU(),
                                  conv(channels, channels, 3, padding=1, bias=False), norm(channels))
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(x + self.body(x))


class ResNet(nn.Module):
    # The layer that fine-tuning treats as the head (a new one when the label set differs; it trains
    # alone while the backbone is frozen). Optional: without it, the last layer with parameters.
    output_layer = "classifier"

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int, blocks: int, pool: int,
                 dropout: float):
        super().__init__()
        images = len(input_shape) == 3
        conv, norm, adaptive = ((nn.Conv2d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d) if images else
                                (nn.Conv1d, nn.BatchNorm1d, nn.AdaptiveAvgPool1d))
        self.stem = nn.Sequential(conv(input_shape[0], width, 3, padding=1, bias=False), norm(width), nn.ReLU())
        self.blocks = nn.Sequential(*(ResidualBlock(width, conv, norm) for _ in range(blocks)))
        # The classifier sees a grid of `pool` positions per axis, not one global average: where a
        # stroke is tells digits apart, and such features carry over to digits the backbone never saw.
        self.pool = nn.Sequential(adaptive(pool), nn.Flatten(), nn.Dropout(dropout))
        self.classifier = nn.Linear(width * pool ** (len(input_shape) - 1), num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.blocks(self.stem(x))))


def build(input_shape: tuple[int, ...], num_classes: int, width: int = 32, blocks: int = 2, pool: int = 4,
          dropout: float = 0.1) -> nn.Module:
    """A residual CNN for images (C, H, W) or signals (C, L) of at least `pool` positions per axis,
    returning (N, num_classes) logits."""
    if len(input_shape) not in (2, 3):
        raise ValueError(f"input_shape must be (C, H, W) or (C, L), got {tuple(input_shape)}")
    if width < 1 or blocks < 0 or pool < 1:
        raise ValueError(f"width and pool must be >= 1 and blocks >= 0, got width={width}, blocks={blocks}, pool={pool}")
    return ResNet(tuple(input_shape), num_classes, width, blocks, pool, dropout)
