"""An example of `model.family: custom`: a small residual CNN in plain PyTorch, built by `build`.

The recipe names the factory and its keyword arguments (configs/digits-custom.yaml):

    model:
      family: custom
      factory: examples.custom_model.digits:build
      kwargs: {width: 32, blocks: 2}

The pipeline imports this module from the directory it runs in, calls ``build`` with the recipe's
``kwargs`` plus the dataset's facts it asks for by parameter name (here ``in_channels`` and
``num_classes``; ``input_shape``, ``in_features``, ``image_size``, ``num_outputs``, ``num_targets`` and
``task`` are offered too), then trains, checkpoints, exports and serves the module like a built-in one.
Editing this file reruns `train` on the next `pipeline run`.
"""

from __future__ import annotations

from torch import nn


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with batch norm, added to the input (He et al. 2016)."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels))
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(x + self.body(x))


class DigitsNet(nn.Module):
    # The layer that fine-tuning treats as the head (a new one when the label set differs; it trains
    # alone while the backbone is frozen). Optional: without it, the last layer with parameters.
    output_layer = "classifier"

    def __init__(self, in_channels: int, num_classes: int, width: int, blocks: int, dropout: float):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        self.blocks = nn.Sequential(*(ResidualBlock(width) for _ in range(blocks)))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout))
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.blocks(self.stem(x))))


def build(in_channels: int, num_classes: int, width: int = 32, blocks: int = 2, dropout: float = 0.1) -> nn.Module:
    """A residual CNN for (N, in_channels, H, W) images of any size, returning (N, num_classes) logits."""
    if width < 1 or blocks < 0:
        raise ValueError(f"width must be >= 1 and blocks >= 0, got width={width}, blocks={blocks}")
    return DigitsNet(in_channels, num_classes, width, blocks, dropout)
