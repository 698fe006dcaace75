"""A variational autoencoder with MLP (any input shape) or convolutional (images) encoder/decoder.

``forward(x) -> (reconstruction, mu, logvar)``. In training mode the latent is sampled with the
reparameterization trick (z = mu + exp(logvar / 2) * eps); in eval mode z = mu, so the exported
autoencoder is deterministic. ``encoder(x) -> (mu, logvar)`` and ``decoder(z) -> reconstruction``
are submodules, exported as their own ONNX files. Reconstructions live in the same (normalized)
space as the inputs, with no output activation: the loss is a Gaussian (MSE) reconstruction term.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


@dataclass(frozen=True)
class Config:
    architecture: Literal["mlp", "conv"] = "mlp"
    hidden: tuple[int, ...] = (256, 128)  # mlp: encoder widths (the decoder mirrors them)
    channels: tuple[int, ...] = (32, 64)  # conv: each block halves height and width
    latent_dim: int = 8

    def __post_init__(self) -> None:
        if self.architecture not in ("mlp", "conv"):
            raise ValueError(f"`architecture` must be mlp or conv, got {self.architecture!r}")
        if any(h <= 0 for h in self.hidden):
            raise ValueError(f"`hidden` must hold positive ints, got {list(self.hidden)}")
        if not self.channels or any(c <= 0 for c in self.channels):
            raise ValueError(f"`channels` must be a non-empty list of positive ints, got {list(self.channels)}")
        if self.latent_dim < 1:
            raise ValueError(f"`latent_dim` must be >= 1, got {self.latent_dim}")


class _Heads(nn.Module):
    """Features -> (mu, logvar)."""

    def __init__(self, body: nn.Module, width: int, latent_dim: int):
        super().__init__()
        self.body = body
        self.mu = nn.Linear(width, latent_dim)
        self.logvar = nn.Linear(width, latent_dim)

    def forward(self, x):
        h = self.body(x)
        return self.mu(h), self.logvar(h)


def _mlp_parts(config: Config, input_shape: tuple[int, ...]) -> tuple[nn.Module, nn.Module]:
    width = math.prod(input_shape)
    enc: list[nn.Module] = [nn.Flatten()]
    w = width
    for h in config.hidden:
        enc += [nn.Linear(w, h), nn.ReLU()]
        w = h
    dec: list[nn.Module] = []
    w = config.latent_dim
    for h in reversed(config.hidden):
        dec += [nn.Linear(w, h), nn.ReLU()]
        w = h
    dec += [nn.Linear(w, width), nn.Unflatten(1, tuple(input_shape))]
    return _Heads(nn.Sequential(*enc), config.hidden[-1] if config.hidden else width, config.latent_dim), \
        nn.Sequential(*dec)


def _conv_parts(config: Config, input_shape: tuple[int, ...]) -> tuple[nn.Module, nn.Module]:
    if len(input_shape) != 3:
        raise ValueError(f"a conv vae needs (C, H, W) images, got shape {input_shape}; use architecture: mlp")
    c, h, w = input_shape
    scale = 2 ** len(config.channels)
    if h % scale or w % scale:
        raise ValueError(f"a conv vae with {len(config.channels)} blocks needs height and width divisible by "
                         f"{scale}, got {h}x{w}; use fewer `channels`")
    enc: list[nn.Module] = []
    in_ch = c
    for out_ch in config.channels:  # 4x4 kernels with stride 2 halve the size exactly
        enc += [nn.Conv2d(in_ch, out_ch, 4, stride=2, padding=1), nn.ReLU()]
        in_ch = out_ch
    small = (in_ch, h // scale, w // scale)
    enc.append(nn.Flatten())
    dec: list[nn.Module] = [nn.Linear(config.latent_dim, math.prod(small)), nn.ReLU(), nn.Unflatten(1, small)]
    for out_ch in reversed(config.channels[:-1]):
        dec += [nn.ConvTranspose2d(in_ch, out_ch, 4, stride=2, padding=1), nn.ReLU()]
        in_ch = out_ch
    dec.append(nn.ConvTranspose2d(in_ch, c, 4, stride=2, padding=1))
    return _Heads(nn.Sequential(*enc), math.prod(small), config.latent_dim), nn.Sequential(*dec)


class VAE(nn.Module):
    def __init__(self, config: Config, input_shape: tuple[int, ...]):
        super().__init__()
        parts = _mlp_parts if config.architecture == "mlp" else _conv_parts
        self.encoder, self.decoder = parts(config, input_shape)
        self.latent_dim = config.latent_dim

    def forward(self, x):
        mu, logvar = self.encoder(x)
        if self.training:
            z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        else:
            z = mu
        return self.decoder(z), mu, logvar


def build(config: Config, input_shape: tuple[int, ...], num_outputs: int = 0) -> nn.Module:
    return VAE(config, input_shape)  # num_outputs is ignored: the latent size is in the config
