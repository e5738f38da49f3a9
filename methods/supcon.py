"""Supervised contrastive Genant grading (Wei et al. 2022): SE-ResNet-50 + SupCon + detached CE.

Each training batch is drawn class-balanced (`batch_size // classes` vertebrae per grade, 3 x 4 in
the paper) and seen as two random views. The encoder learns only from the SupCon loss (temperature
0.07) on L2-normalised 128-d projections, with the grade (or the fracture label) naming the
positives; the linear classifier learns from CE on the detached features. Total = CE + SupCon.
The SupCon loss is pytorch-metric-learning's (Khosla et al. 2020, L_out).

The backbone is MONAI's `SEResNet50` (in_channels 3: grey CT replicated); the CPU presets scale
every stage's width by `model.width` (1.0 is MONAI's network).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from monai.networks.nets import SEResNet50
from omegaconf import DictConfig
from pytorch_metric_learning.losses import SupConLoss
from torch import nn

from bench.datasets.torch_data import BalancedBatchSampler
from bench.methods.augment import TwoViews
from bench.methods.base import Classifier, Method
from bench.registry import register_method


class ScaledSEResNet50(SEResNet50):
    """MONAI's SEResNet50 with every stage's planes (and the stem) multiplied by `width`."""

    def __init__(self, width: float, in_channels: int, layers: tuple[int, ...]) -> None:
        self.width = width  # read by _make_layer during the parent's __init__
        super().__init__(layers=layers, inplanes=max(8, int(64 * width)), spatial_dims=3,
                         in_channels=in_channels, num_classes=1)
        self.features_dim = int(512 * width) * 4
        self.last_linear = nn.Identity()  # our head replaces it

    def _make_layer(self, block, planes, blocks, groups, reduction, stride=1, downsample_kernel_size=1):
        return super()._make_layer(block, max(4, int(planes * self.width)), blocks, groups, reduction,
                                   stride, downsample_kernel_size)


class SEEncoder(nn.Module):
    """(B, 1, D, H, W) -> (B, F) pooled SE-ResNet features, grey replicated to `in_channels`."""

    def __init__(self, width: float, in_channels: int, layers: tuple[int, ...]) -> None:
        super().__init__()
        self.net = ScaledSEResNet50(width, in_channels, layers)
        self.in_channels = in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.in_channels:
            x = x.expand(-1, self.in_channels, -1, -1, -1)
        return torch.flatten(self.net.adaptive_avg_pool(self.net.features(x)), 1)


class SupConClassifier(Classifier):
    """The classifier plus the projector that only the SupCon loss uses."""

    def __init__(self, encoder: nn.Module, head: nn.Module, projector: nn.Module) -> None:
        super().__init__(encoder, head)
        self.projector = projector

    def forward(self, x: torch.Tensor, contrastive: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits; with `contrastive`, (unit projections, logits of the head on detached features):
        one forward, so that a `torch.compile`d model compiles the training step too."""
        features = self.encoder(x)
        if not contrastive:
            return self.head(features)
        return F.normalize(self.projector(features).float(), dim=1), self.head(features.detach())


@dataclass
class SupConParams:
    width: float = 1.0
    layers: list[int] = field(default_factory=lambda: [3, 4, 6, 3])
    in_channels: int = 3
    projection_dim: int = 128
    temperature: float = 0.07
    min_crop: float = 0.8  # smallest kept share of each axis in a view
    balanced_batches: bool = True


@register_method("supcon")
class SupCon(Method):
    channels_last = True
    description = "Wei et al. 2022: 3D SE-ResNet-50, SupCon (t=0.07) + CE on detached features, balanced batches"
    Params = SupConParams
    presets = {
        "tiny": {"model": {"width": 0.125, "layers": [1, 1, 1, 1], "projection_dim": 32}},
        "small": {"amp": True, "model": {"width": 0.25, "layers": [2, 2, 2, 2]}},
        "paper": {"batch_size": 12},  # 3 vertebrae per grade x 4 grades
    }

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        self.supcon = SupConLoss(temperature=self.params.temperature)
        self.views = TwoViews(self.params.min_crop)

    def build_encoder(self) -> tuple[nn.Module, int]:
        p = self.params
        enc = SEEncoder(p.width, p.in_channels, tuple(p.layers))
        return enc, enc.net.features_dim

    def build_model(self, num_classes: int = 2) -> Classifier:
        encoder, features = self.build_encoder()
        projector = nn.Linear(features, self.params.projection_dim)  # Linear(2048 -> 128) as published
        return self.checkpointed(SupConClassifier(encoder, self.build_head(features, num_classes), projector))

    def training_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module) -> torch.Tensor:
        a, b = self.views(x)
        z, logits = model(torch.cat([a, b]), contrastive=True)
        labels = torch.cat([y, y])
        return loss_fn(logits.float(), labels) + self.supcon(z, labels)

    def train_batch_sampler(self, labels, batch_size: int, seed: int):
        if not self.params.balanced_batches:
            return None
        return BalancedBatchSampler(labels, batch_size, seed)
