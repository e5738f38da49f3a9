"""BYOL in 3D (Grill et al. 2020) as a vertebench plugin, written only against the documented
`Method` surface: a student (encoder, projector, predictor) learns to predict a frozen momentum
teacher's projection of the other view.

- parameter groups: the teacher is frozen (requires_grad False, in no group); the predictor trains
  without weight decay;
- step hook: after every optimiser step the teacher moves towards the student,
  teacher = m * teacher + (1 - m) * student, with m rising from `base_momentum` to 1 on a cosine
  schedule over all pretraining steps (BYOL's rule);
- epoch hook: logs the momentum of the epoch's start in the loss curve.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench import register_method
from bench.methods.base import Method


def cnn_encoder(width: int) -> nn.Module:
    """(B, 1, S, S, S) -> (B, 2 * width): two strided conv blocks and global pooling."""
    return nn.Sequential(nn.Conv3d(1, width, 3, stride=2, padding=1), nn.BatchNorm3d(width), nn.ReLU(inplace=True),
                         nn.Conv3d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm3d(2 * width),
                         nn.ReLU(inplace=True), nn.AdaptiveAvgPool3d(1), nn.Flatten())


def view(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Flips along every axis, intensity scale and shift, Gaussian noise."""
    flips = [axis + 1 for axis in range(3) if rng.random() < 0.5]
    x = torch.flip(x, flips) if flips else x
    noise = torch.from_numpy(rng.normal(0, 0.02, x.shape).astype(np.float32))
    return (x * rng.uniform(0.8, 1.2) + rng.uniform(-0.1, 0.1) + noise).clamp(0, 1)


def two_views(x: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return view(x, rng), view(x, rng)


def mlp(cin: int, hidden: int, cout: int) -> nn.Module:
    return nn.Sequential(nn.Linear(cin, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, cout))


def momentum_at(step: int, total_steps: int, base: float) -> float:
    """BYOL's schedule: 1 - (1 - base) * (cos(pi * step / total) + 1) / 2."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * step / max(total_steps, 1)) + 1.0) / 2.0


class BYOLPretext(nn.Module):
    def __init__(self, encoder: nn.Module, features: int, dim: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = mlp(features, 2 * features, dim)
        self.predictor = mlp(dim, 2 * dim, dim)
        self.teacher = nn.ModuleDict({"encoder": copy.deepcopy(encoder), "projector": copy.deepcopy(self.projector)})
        self.teacher.requires_grad_(False)

    def student_modules(self) -> list[nn.Module]:
        return [self.encoder, self.projector]

    def forward(self, views: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        a, b = views
        online = self.predictor(self.projector(self.encoder(torch.cat([a, b]))))
        with torch.no_grad():
            self.teacher.eval()
            target = self.teacher["projector"](self.teacher["encoder"](torch.cat([b, a])))
        cosine = F.cosine_similarity(online.float(), target.float().detach(), dim=1)
        return {"loss": 2 - 2 * cosine.mean()}

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        for student, teacher in zip(self.student_modules(), (self.teacher["encoder"], self.teacher["projector"])):
            for s, t in zip(student.parameters(), teacher.parameters()):
                t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)
            for s, t in zip(student.buffers(), teacher.buffers()):
                t.copy_(s)


@register_method("byol3d")
class BYOL3D(Method):
    description = "BYOL in 3D (Grill et al. 2020): EMA teacher, predictor; an outsider's plugin"
    regimes = ("scratch", "vertebrae")

    @dataclass
    class Params:
        width: int = 8
        projection_dim: int = 32
        base_momentum: float = 0.99

    def build_encoder(self) -> tuple[nn.Module, int]:
        return cnn_encoder(self.params.width), 2 * self.params.width

    def pretext_data(self, stage: str) -> str:
        return "volume"

    def pretext_views(self, stage: str):
        return two_views

    def build_pretext(self, stage: str = "vertebrae") -> nn.Module:
        encoder, features = self.build_encoder()
        return BYOLPretext(encoder, features, self.params.projection_dim)

    def pretext_param_groups(self, pretext: nn.Module) -> list[dict]:
        student = [p for m in pretext.student_modules() for p in m.parameters()]
        return [{"params": student}, {"params": list(pretext.predictor.parameters()), "weight_decay": 0.0}]

    def on_pretext_step(self, pretext: nn.Module, step: int, total_steps: int) -> None:
        pretext.update_teacher(momentum_at(step, total_steps, self.params.base_momentum))

    def on_pretext_epoch(self, pretext: nn.Module, epoch: int, epochs: int) -> dict[str, float]:
        return {"momentum": momentum_at(epoch, epochs, self.params.base_momentum)}
