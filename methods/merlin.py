"""Merlin (Blankemeier et al., "Merlin: a computed tomography vision-language foundation model and
dataset", Nature 2026; StanfordMIMI/Merlin): an I3D-inflated ResNet-152 image encoder trained on
15,331 abdominal CTs against their EHR phenotypes and radiology reports: `merlin`.

Encoder, as `merlin/models/i3res.py` and `inflate.py` build it (verified at commit 2489a96):
torchvision's ResNet-152 inflated to 3D. The stem is a (3, 7, 7) convolution with stride (1, 2, 2)
and no bias over three input channels (the grey volume repeated three times), BatchNorm, ReLU and a
(3, 3, 3) max-pool with stride 2; every bottleneck's 1x1 convolutions become (1, 1, 1), its 3x3 a
(3, 3, 3) with the block's stride on all three axes, its downsample a (1, 1, 1) convolution with that
stride. The network reads (B, C, depth, H, W): Merlin permutes its RAS volume (H, W, D) so that depth
comes first. The pooled 2048 features are Merlin's image embedding (`ImageEmbedding=True`).

Checkpoints (`merlin/models/load.py`): the released file is a flat state dict of the whole
`MerlinArchitecture`, the encoder under `encode_image.i3_resnet.` beside its phenotype classifier
and contrastive head (`classifier.*`, `contrastive_head.*`), the text tower (`encode_text.*`) and
`logit_scale`; the five-year-prediction file holds the i3_resnet's own keys. Everything outside the
encoder is listed as ignored.

Preprocessing as Merlin's (`merlin/data/monai_transforms.py`): RAS, HU [-1000, 1000] -> [0, 1] (the
harness's own window), voxels of 1.5 x 1.5 x 3 mm: the depth axis is resampled to half the in-plane
resolution inside the encoder (`model.depth_scale`), so the inflated kernels see Merlin's aspect.

Pretext. `public` (the embedded stand-in on the body-CT corpus): Merlin's two supervisions in
miniature. The EHR phenotypes become the organs a crop shows (a multi-label BCE through the
classifier, as Merlin's phenotype head), and the report becomes the crop's organ composition, encoded
by a small text-tower stand-in and aligned with the image's contrastive head by a symmetric CLIP
loss. `vertebrae` (no reports): the same contrastive head aligns two augmented views (InfoNCE).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from bench.methods.augment import TwoViews
from bench.methods.base import Method
from bench.methods.inputs import hu_window
from bench.methods.pretext import PretextTask
from bench.registry import register_method
from bench.weights import WeightsSpec

PREFIXES = ("module.encode_image.i3_resnet.", "encode_image.i3_resnet.", "i3_resnet.", "")
EXPANSION = 4  # ResNet bottleneck
RELEASED_FILE = "i3_resnet_clinical_longformer_best_clip_04-02-2024_23-21-36_epoch_99.pt"  # the Hugging Face release


def convert_merlin(state: dict[str, torch.Tensor], target: nn.Module) -> dict[str, torch.Tensor]:
    """The keys under whichever published prefix holds the most of `target`'s keys; the other keys of
    the file (text tower, logit scale) stay outside and are listed as ignored."""
    own = set(target.state_dict())

    def under(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

    return max((under(p) for p in PREFIXES), key=lambda s: len(own & set(s)))


class InflatedBottleneck(nn.Module):
    """torchvision's Bottleneck (stride on the 3x3) with Merlin's inflated kernels."""

    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        out = planes * EXPANSION
        self.conv1 = nn.Conv3d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv3d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm3d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class I3DResNet(nn.Module):
    """Merlin's image encoder: (B, 3, depth, H, W) -> (B, 8 * width * 4 / 2) = (B, 2048) at width 64."""

    def __init__(self, layers: list[int], width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(3, width, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False)
        self.bn1 = nn.BatchNorm3d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
        inplanes = width
        for i, blocks in enumerate(layers):
            planes, stride = width * 2 ** i, 1 if i == 0 else 2
            stage = []
            for j in range(blocks):
                stage.append(InflatedBottleneck(inplanes, planes, stride if j == 0 else 1))
                inplanes = planes * EXPANSION
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.num_layers, self.features = len(layers), inplanes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_layers):
            x = getattr(self, f"layer{i + 1}")(x)
        return x.mean(dim=(2, 3, 4))


@dataclass
class MerlinParams:
    layers: list[int] = field(default_factory=lambda: [3, 8, 36, 3])  # ResNet-152
    width: int = 64
    hu_window: list[float] = field(default_factory=lambda: [-1000.0, 1000.0])
    depth_scale: float = 0.5  # Merlin's 3 mm slices over its 1.5 mm pixels
    report_dim: int = 512  # Merlin's contrastive space
    temperature: float = 0.07


class MerlinEncoder(nn.Module):
    """A RAS crop (B, 1, X, Y, Z) -> Merlin's input (window, depth resampled and first, three
    channels) -> the pooled I3D features."""

    def __init__(self, p: MerlinParams) -> None:
        super().__init__()
        self.window = hu_window(p.hu_window)
        self.depth_scale = float(p.depth_scale)
        self.net = I3DResNet(list(p.layers), p.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.window(x)
        if self.depth_scale != 1.0:
            depth = max(1, round(x.shape[-1] * self.depth_scale))
            x = F.interpolate(x, size=(*x.shape[2:4], depth), mode="trilinear", align_corners=False)
        x = x.permute(0, 1, 4, 2, 3)  # (B, 1, Z, X, Y): depth first, as Merlin's forward
        return self.net(x.expand(-1, 3, -1, -1, -1))


def clip_loss(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between paired rows of `a` and `b` (CLIP's loss)."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    logits = a @ b.T / temperature
    target = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def organ_report(organs: torch.Tensor, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, X, Y, Z) label maps -> the organs present (multi-hot, background dropped) and the crop's
    organ composition (voxel fractions), the stand-ins of a scan's phenotypes and its report."""
    fractions = F.one_hot(organs.long().flatten(1), classes).float().mean(dim=1)[:, 1:]
    return (fractions > 0).float(), fractions


class MerlinPretext(PretextTask):
    """Merlin's pretexts train the I3D ResNet inside the input adapter (`encoder.net`), which is what
    public weights fill and what reaches the classifier."""

    def pretrained_encoder(self) -> nn.Module:
        return self.encoder.net


class PhenotypeReportPretext(MerlinPretext):
    """Merlin's EHR phenotype BCE and image-report CLIP loss, on the body-CT corpus's label maps."""

    def __init__(self, encoder: MerlinEncoder, features: int, classes: int, p: MerlinParams) -> None:
        super().__init__()
        self.encoder, self.classes, self.temperature = encoder, classes, p.temperature
        self.classifier = nn.Linear(features, classes - 1)  # Merlin's 1x1x1 conv on the pooled map
        self.contrastive_head = nn.Linear(features, p.report_dim)
        self.report_encoder = nn.Sequential(nn.Linear(classes - 1, p.report_dim), nn.GELU(),
                                            nn.Linear(p.report_dim, p.report_dim))

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, organs = batch
        present, composition = organ_report(organs, self.classes)
        features = self.encoder(x)
        phenotype = F.binary_cross_entropy_with_logits(self.classifier(features).float(), present)
        report = clip_loss(self.contrastive_head(features), self.report_encoder(composition), self.temperature)
        return {"loss": phenotype + report, "phenotype": phenotype.detach(), "report": report.detach()}


class ViewContrastPretext(MerlinPretext):
    """Without reports: the contrastive head aligns two augmented views of a crop."""

    def __init__(self, encoder: MerlinEncoder, features: int, p: MerlinParams) -> None:
        super().__init__()
        self.encoder, self.temperature = encoder, p.temperature
        self.contrastive_head = nn.Linear(features, p.report_dim)
        self.views = TwoViews(min_scale=0.5)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        v0, v1 = self.views(x)
        return {"loss": clip_loss(self.contrastive_head(self.encoder(v0)), self.contrastive_head(self.encoder(v1)),
                                  self.temperature)}


@register_method("merlin")
class Merlin(Method):
    description = "Merlin I3D ResNet-152 image encoder, CT vision-language pretraining (Blankemeier et al., 2026)"
    regimes = ("scratch", "public", "public_to_vertebrae")
    Params = MerlinParams
    channels_last = True
    presets = {
        "tiny": {"model": {"layers": [1, 1, 1, 1], "width": 4}},
        "small": {"amp": True, "head_init": "linear_probe", "model": {"layers": [1, 1, 1, 1], "width": 8}},
    }
    public_weights = WeightsSpec(
        filename=RELEASED_FILE, url="", sha256="", hf_repo="stanfordmimi/Merlin", hf_file=RELEASED_FILE,
        licence="MIT (Hugging Face model card; code StanfordMIMI/Merlin MIT too)",
        trained_on="15,331 abdominal CTs with EHR phenotypes and radiology reports (Stanford)",
        layout="flat {'encode_image.i3_resnet.{conv1,bn1,layer{1-4}.<j>.*}', 'encode_image.i3_resnet.classifier.*', "
               "'encode_text.*', 'logit_scale'} or the i3_resnet's own keys (five-year file)",
        convert=convert_merlin,
    )

    def build_encoder(self) -> tuple[nn.Module, int]:
        encoder = MerlinEncoder(self.params)
        return encoder, encoder.net.features

    def finetune_encoder(self, model: nn.Module) -> nn.Module:
        return model.encoder.net

    def layer_groups(self) -> dict:
        return {"stem": r"^encoder\.net\.(?:conv1|bn1)", "blocks": r"^encoder\.net\.layer(\d+)"}

    def cam_layer(self, model: nn.Module) -> str:
        return f"encoder.net.layer{len(self.params.layers)}"

    def cam_to_input(self, cam: torch.Tensor) -> torch.Tensor:
        """Grad-CAM is taken in Merlin's (Z, X, Y) frame: back to the crop's axes (X, Y, Z)."""
        return cam.permute(0, 2, 3, 1)

    def pretext_data_kind(self, stage: str) -> str:
        return "segmentation" if stage == "public" else "volume"

    def build_pretext(self, stage: str = "vertebrae") -> nn.Module:
        from bench.datasets.corpora import ORGANS

        encoder, features = self.build_encoder()
        if stage == "public":
            return PhenotypeReportPretext(encoder, features, len(ORGANS), self.params)
        return ViewContrastPretext(encoder, features, self.params)
