"""SimCLR in 3D (Chen et al. 2020) as a vertebench plugin, written only against the documented
`Method` surface: two augmented views of each unlabelled vertebra, NT-Xent between their projections.

The views are made per sample in the data loader (`pretext_views`), from the generator vertebench
seeds per sample and epoch: a random crop of 60-100 % of each axis resized back, flips along every
axis, and a random intensity scale and shift.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench import register_method
from bench.methods.base import Method


def cnn_encoder(width: int) -> nn.Module:
    """(B, 1, S, S, S) -> (B, 4 * width): three strided conv blocks and global pooling."""
    layers: list[nn.Module] = []
    channels = [1, width, 2 * width, 4 * width]
    for cin, cout in zip(channels[:-1], channels[1:]):
        layers += [nn.Conv3d(cin, cout, 3, stride=2, padding=1), nn.BatchNorm3d(cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool3d(1), nn.Flatten())


def augment(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """One random view of a (1, S, S, S) crop in [0, 1]."""
    size = x.shape[-1]
    edges = [max(4, int(round(size * rng.uniform(0.6, 1.0)))) for _ in range(3)]
    starts = [int(rng.integers(0, size - e + 1)) for e in edges]
    view = x[:, starts[0]:starts[0] + edges[0], starts[1]:starts[1] + edges[1], starts[2]:starts[2] + edges[2]]
    view = F.interpolate(view[None], size=(size,) * 3, mode="trilinear", align_corners=False)[0]
    flips = [axis + 1 for axis in range(3) if rng.random() < 0.5]
    if flips:
        view = torch.flip(view, flips)
    return (view * rng.uniform(0.8, 1.2) + rng.uniform(-0.1, 0.1)).clamp(0, 1)


def two_views(x: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return augment(x, rng), augment(x, rng)


def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent over 2B unit vectors, sample i and i + B being the positive pair."""
    n = len(z) // 2
    logits = z @ z.t() / temperature
    logits = logits.masked_fill(torch.eye(len(z), dtype=torch.bool, device=z.device), float("-inf"))
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, positives)


class SimCLRPretext(nn.Module):
    def __init__(self, encoder: nn.Module, features: int, projection_dim: int, temperature: float) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = nn.Sequential(nn.Linear(features, features), nn.ReLU(inplace=True),
                                       nn.Linear(features, projection_dim))
        self.temperature = temperature

    def forward(self, views: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        a, b = views
        z = F.normalize(self.projector(self.encoder(torch.cat([a, b]))).float(), dim=1)
        return {"loss": nt_xent(z, self.temperature)}


@register_method("simclr3d")
class SimCLR3D(Method):
    description = "SimCLR in 3D (Chen et al. 2020): two views, NT-Xent; an outsider's plugin"
    regimes = ("scratch", "vertebrae")

    @dataclass
    class Params:
        width: int = 8
        projection_dim: int = 32
        temperature: float = 0.2

    def build_encoder(self) -> tuple[nn.Module, int]:
        return cnn_encoder(self.params.width), 4 * self.params.width

    def pretext_data(self, stage: str) -> str:
        return "volume"

    def pretext_views(self, stage: str):
        return two_views

    def build_pretext(self, stage: str = "vertebrae") -> nn.Module:
        encoder, features = self.build_encoder()
        return SimCLRPretext(encoder, features, self.params.projection_dim, self.params.temperature)
