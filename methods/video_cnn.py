"""Video-pretrained 3D CNNs (Ke et al. 2023): R3D-18, MC3-18 and R(2+1)D-18.

The networks are torchvision's video ResNets, built from torchvision's own blocks, with one knob
added: the base width (64 in torchvision). At width 64 every parameter name and shape is
torchvision's, so its Kinetics-400 checkpoints (`r3d_18-b3b3357e.pth`, ...) load unchanged with
`weights.public=PATH`; the CPU presets use a narrower network. Grey CT is replicated to three
channels and normalised with the Kinetics statistics; the views axis (sagittal by default) becomes
time, as a CT stack is read as a clip. The Kinetics classifier `fc` is dropped for a new head.

Embedded `public` regime: a self-supervised proxy for Kinetics pretraining, contrastive learning
on the procedural video corpus (two random resized crops of a clip are a positive pair, the other
clips of the batch negatives; NT-Xent, as CVRL, Qian et al. 2021). `public_to_vertebrae` continues
the same objective on unlabelled vertebra crops.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from monai.losses import ContrastiveLoss
from torch import nn
from torchvision.models.video.resnet import BasicBlock, Conv2Plus1D, Conv3DNoTemporal, Conv3DSimple, VideoResNet

from bench.datasets.views import AXES, slice_positions
from bench.errors import BenchError
from bench.methods.augment import TwoViews
from bench.methods.base import Method
from bench.methods.pretext import PretextTask
from bench.registry import register_method
from bench.weights import WeightsSpec

KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)


def basic_stem(width: int) -> nn.Sequential:
    """torchvision's BasicStem at another width (indices 0, 1, 2 as there)."""
    return nn.Sequential(
        nn.Conv3d(3, width, kernel_size=(3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False),
        nn.BatchNorm3d(width), nn.ReLU(inplace=True))


def r2plus1d_stem(width: int) -> nn.Sequential:
    """torchvision's R2Plus1dStem (45 mid channels at width 64) at another width."""
    mid = max(1, 45 * width // 64)
    return nn.Sequential(
        nn.Conv3d(3, mid, kernel_size=(1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3), bias=False),
        nn.BatchNorm3d(mid), nn.ReLU(inplace=True),
        nn.Conv3d(mid, width, kernel_size=(3, 1, 1), stride=(1, 1, 1), padding=(1, 0, 0), bias=False),
        nn.BatchNorm3d(width), nn.ReLU(inplace=True))


ARCHS: dict[str, tuple[Any, list[type], list[int]]] = {
    "r3d_18": (basic_stem, [Conv3DSimple] * 4, [2, 2, 2, 2]),
    "mc3_18": (basic_stem, [Conv3DSimple] + [Conv3DNoTemporal] * 3, [2, 2, 2, 2]),
    "r2plus1d_18": (r2plus1d_stem, [Conv2Plus1D] * 4, [2, 2, 2, 2]),
}


class VideoResNetEncoder(VideoResNet):
    """torchvision's VideoResNet at a given base width, without the classifier: (B, 8 * width).

    Accepts RGB clips (B, 3, T, H, W) in [0, 1] and grey CT crops (B, 1, X, Y, Z) in [0, 1]; the
    latter are turned into clips with `time_axis` (0, 1, 2 of the crop) as time, every slice a frame
    or, with `frames`, that many equidistant slices (the slice-view rule of the video methods).
    """

    def __init__(self, arch: str, width: int = 64, time_axis: int = 0, frames: int = 0) -> None:
        nn.Module.__init__(self)  # VideoResNet.__init__ fixes the width at 64; the layout is rebuilt here
        stem, conv_makers, layers = ARCHS[arch]
        self.inplanes = width
        self.stem = stem(width)
        self.layer1 = self._make_layer(BasicBlock, conv_makers[0], width, layers[0], stride=1)
        self.layer2 = self._make_layer(BasicBlock, conv_makers[1], 2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(BasicBlock, conv_makers[2], 4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(BasicBlock, conv_makers[3], 8 * width, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool3d((1, 1, 1))
        self.fc = nn.Identity()
        self.features = 8 * width
        self.time_axis = time_axis
        self.frames = frames
        self.register_buffer("mean", torch.tensor(KINETICS_MEAN).view(1, 3, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(KINETICS_STD).view(1, 3, 1, 1, 1), persistent=False)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def as_clip(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            order = [self.time_axis] + [a for a in range(3) if a != self.time_axis]
            x = x.permute(0, 1, *(2 + a for a in order))
            if self.frames and x.shape[2] >= self.frames + 2:  # the outermost slices are never taken
                x = x[:, :, torch.from_numpy(slice_positions(x.shape[2], self.frames)).to(x.device)]
            x = x.expand(-1, 3, -1, -1, -1)
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.as_clip(x))


def convert_torchvision(raw: dict[str, torch.Tensor], target: nn.Module) -> dict[str, torch.Tensor]:
    """torchvision's video checkpoints are plain state dicts in our layout; `fc` is Kinetics' head."""
    return {k: v for k, v in raw.items() if not k.startswith("fc.")}


def _spec(arch: str, digest: str) -> WeightsSpec:
    name = f"{arch}-{digest}.pth"
    return WeightsSpec(
        filename=name, url=f"https://download.pytorch.org/models/{name}",
        sha256="",  # torchvision publishes only the first 8 hex digits of the sha256, in the file name
        layout="torchvision VideoResNet state dict: stem.*, layer{1-4}.{0,1}.conv{1,2}.*, fc.* (Kinetics-400)",
        convert=convert_torchvision, licence="BSD-3-Clause (torchvision)", trained_on="Kinetics-400 (videos)")


class ContrastivePretext(PretextTask):
    """encoder -> MLP projector; NT-Xent between two random resized crops of each clip."""

    def __init__(self, encoder: VideoResNetEncoder, projection_dim: int, temperature: float,
                 min_scale: float, out_size: tuple[int, int, int] | None) -> None:
        super().__init__()
        f = encoder.features
        self.encoder = encoder
        self.projector = nn.Sequential(nn.Linear(f, f), nn.ReLU(inplace=True), nn.Linear(f, projection_dim))
        self.loss = ContrastiveLoss(temperature=temperature)
        self.views = TwoViews(min_scale, out_size)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        a, b = self.views(x)
        za, zb = self.projector(self.encoder(a)), self.projector(self.encoder(b))
        return {"loss": self.loss(za.float(), zb.float())}


@dataclass
class VideoCNNParams:
    width: int = 64  # torchvision's; the public Kinetics weights need 64
    frames: int = 0  # CT crops as clips of this many equidistant slices; 0 (or too few slices): every slice
    projection_dim: int = 128
    temperature: float = 0.1
    min_crop: float = 0.6  # smallest kept share of each axis in a pretext view
    pretext_frames: int = 16  # pretext clips: this many frames (CVRL-style resize)
    pretext_size: int = 0  # edge of pretext views (clips and vertebra volumes); 0: the crop size


class _VideoCNN(Method):
    channels_last = True
    regimes = ("scratch", "public", "public_to_vertebrae")
    Params = VideoCNNParams
    arch: ClassVar[str] = ""
    presets = {
        "tiny": {"model": {"width": 8, "projection_dim": 32}},
        "small": {"amp": True, "model": {"width": 16, "frames": 16, "projection_dim": 64, "pretext_size": 24}},
    }

    def pretext_data_kind(self, stage: str) -> str:
        return "video" if stage == "public" else "volume"  # adaptation on whole vertebra crops

    def build_encoder(self) -> tuple[nn.Module, int]:
        if self.params.frames < 0:
            raise BenchError(f"model.frames={self.params.frames}: expected 0 (every slice) or a number of frames")
        enc = VideoResNetEncoder(self.arch, self.params.width, AXES[self.cfg.views.axis], self.params.frames)
        return enc, enc.features

    def build_pretext(self, stage: str = "vertebrae") -> nn.Module:
        encoder, _ = self.build_encoder()
        p = self.params
        size = p.pretext_size or self.cfg.crop_size
        out = (p.pretext_frames, size, size) if stage == "public" else (size, size, size)
        return ContrastivePretext(encoder, p.projection_dim, p.temperature, p.min_crop, out)


@register_method("r3d_18")
class R3D18(_VideoCNN):
    description = "3D ResNet-18 (torchvision layout), Kinetics/video-pretrained (Ke et al. 2023)"
    arch = "r3d_18"
    public_weights = _spec("r3d_18", "b3b3357e")


@register_method("mc3_18")
class MC318(_VideoCNN):
    description = "Mixed-convolution MC3-18 (torchvision layout), video-pretrained (Ke et al. 2023)"
    arch = "mc3_18"
    public_weights = _spec("mc3_18", "a90a0ba3")


@register_method("r2plus1d_18")
class R2Plus1D18(_VideoCNN):
    description = "R(2+1)D-18 (torchvision layout), video-pretrained (Ke et al. 2023)"
    arch = "r2plus1d_18"
    public_weights = _spec("r2plus1d_18", "91a641e6")
