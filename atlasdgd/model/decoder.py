"""The decoder: a shared trunk and one softmax head per modality (multiDGD layout)."""

from __future__ import annotations

import math

import torch
from torch import nn


def head_width(n_features: int) -> int:
    """Width of a head's last hidden layer: max(100, round(sqrt(F)))."""
    return max(100, round(math.sqrt(n_features)))


def _mlp(sizes: list[int]) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return layers


class Decoder(nn.Module):
    """Maps a representation to log expression fractions ``log y`` per modality."""

    def __init__(
        self,
        in_dim: int,
        modality_sizes: dict[str, int],
        hidden: tuple[int, ...] = (100, 100),
        head_layers: int = 1,
    ):
        super().__init__()
        self.trunk = nn.Sequential(*_mlp([in_dim, *hidden]))
        trunk_out = hidden[-1] if hidden else in_dim
        self.heads = nn.ModuleDict()
        for name, n_features in modality_sizes.items():
            width = head_width(n_features)
            sizes = [trunk_out] + [width] * head_layers
            self.heads[name] = nn.Sequential(*_mlp(sizes), nn.Linear(sizes[-1], n_features))

    def forward(self, z: torch.Tensor, modalities: list[str] | None = None) -> dict[str, torch.Tensor]:
        h = self.trunk(z)
        names = modalities if modalities is not None else list(self.heads)
        # log-softmax in fp32 even when the matrix products run in bf16 (mixed precision)
        return {m: torch.log_softmax(_at_least_fp32(self.heads[m](h)), dim=-1) for m in names}


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
