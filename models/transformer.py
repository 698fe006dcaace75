"""A small Transformer encoder classifier (ViT-style) for signals (C, L) or images (C, H, W).

The input is cut into non-overlapping patches (``patch_size`` steps, or ``patch_size`` x
``patch_size`` pixels), each linearly embedded; a learned positional embedding is added, then
pre-norm encoder blocks (multi-head self-attention, GELU MLP), then a CLS token or the mean over
tokens feeds a linear head. Attention is written out with ``scaled_dot_product_attention`` rather
than ``nn.TransformerEncoderLayer``, whose inference fast path the ONNX exporters do not trace.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Config:
    patch_size: int = 4
    dim: int = 64
    depth: int = 3
    heads: int = 4
    mlp_ratio: int = 2
    pooling: Literal["cls", "mean"] = "cls"
    dropout: float = 0.1

    def __post_init__(self) -> None:
        for name in ("patch_size", "dim", "depth", "heads", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if self.dim % self.heads:
            raise ValueError(f"`dim` ({self.dim}) must be divisible by `heads` ({self.heads})")
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"`pooling` must be cls or mean, got {self.pooling!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {self.dropout}")


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(mlp_ratio * dim, dim), nn.Dropout(dropout))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TransformerClassifier(nn.Module):
    def __init__(self, config: Config, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        p = config.patch_size
        if len(input_shape) == 2:
            c, length = input_shape
            if length % p:
                raise ValueError(f"transformer: signal length {length} is not a multiple of `patch_size` {p}")
            self.embed: nn.Module = nn.Conv1d(c, config.dim, p, stride=p)  # one linear map per patch
            tokens = length // p
        elif len(input_shape) == 3:
            c, h, w = input_shape
            if h % p or w % p:
                raise ValueError(f"transformer: image {h}x{w} is not a multiple of `patch_size` {p}")
            self.embed = nn.Conv2d(c, config.dim, p, stride=p)
            tokens = (h // p) * (w // p)
        else:
            raise ValueError(f"transformer needs (C, L) signals or (C, H, W) images, got shape {input_shape}")
        self.pooling = config.pooling
        if config.pooling == "cls":
            self.cls = nn.Parameter(torch.zeros(1, 1, config.dim))
            tokens += 1
        self.pos = nn.Parameter(torch.randn(1, tokens, config.dim) * 0.02)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.Sequential(*[Block(config.dim, config.heads, config.mlp_ratio, config.dropout)
                                      for _ in range(config.depth)])
        self.norm = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, num_classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)  # (N, tokens, dim)
        if self.pooling == "cls":
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.blocks(self.drop(x + self.pos))
        x = self.norm(x)
        return self.head(x[:, 0] if self.pooling == "cls" else x.mean(dim=1))


def build(config: Config, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    return TransformerClassifier(config, input_shape, num_outputs)

