"""CT-FM (Pai et al., "Vision foundation models for computed tomography", 2025; project-lighter):
a SegResNetDS encoder pretrained with intra-sample SimCLR on 148,000 CTs of the Imaging Data
Commons: `ctfm`.

Encoder: MONAI `SegResEncoder` (init filters 32, blocks 1-2-2-4-4, BatchNorm, ReLU; about 77 M
parameters), its last level pooled globally into a linear head.

Checkpoints, confirmed in project-lighter/CT-FM (commit f58c89a; `evaluation/baselines/
segresencoder_ctfm.yaml`, `experiments/fm/backbones/segresenc.yaml`) and lighter-zoo 0.1.3 (the Hub
wrapper, a `SegResEncoder` with `PyTorchModelHubMixin`):
- `project-lighter/ct_fm_feature_extractor` on the Hub: `model.safetensors`, the encoder's own keys
  (`conv_init.weight`, `layers.<k>.blocks.<j>.*`, `layers.<k>.downsample.*`);
- the Lightning checkpoint: `{'state_dict': {'backbone.<encoder key>', ...}}` (the
  reconstruction variants: `backbone.encoder.<key>`); `ct_fm_segresnet` keeps a whole SegResNetDS,
  encoder under `encoder.`.
Every encoder tensor must come from the file (bench.weights.load_into).

Preprocessing as CT-FM's: orientation SPL (the harness's RAS crops permuted and flipped), intensities
windowed to [-1024, 2048] HU and scaled to [0, 1] (`model.hu_window`); the harness's crops stop at
1000 HU, so brighter bone stays at that value. The CPU presets, whose narrowed networks cannot load a
CT-FM file, keep the harness's [-1000, 1000] window (see `presets`).

Pretext (`public_to_vertebrae`, and the embedded `public` stand-in on the body-CT corpus): CT-FM's
intra-sample SimCLR (`experiments/fm/frameworks/intrasample_simclr.yaml`, `loss/
intrasample_ntxent_loss.py`): `model.pretext_crops` random sub-volumes of each scan (15 there; half
the crop's edge here), two random resized views of each (scale 0.33-1, a random flip), a projection
head, and an NT-Xent loss (temperature 0.1) whose negatives are the *other crops of the same scan*.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from monai.networks.nets.segresnet_ds import SegResEncoder
from torch import nn

from bench.errors import BenchError
from bench.methods.augment import TwoViews
from bench.methods.base import Method
from bench.methods.inputs import Reorient, hu_window
from bench.methods.models_genesis import random_cube
from bench.methods.pretext import PretextTask
from bench.registry import register_method
from bench.weights import WeightsSpec

PREFIXES = ("backbone.encoder.", "backbone.", "encoder.", "")


def convert_ctfm(state: dict[str, torch.Tensor], target: nn.Module) -> dict[str, torch.Tensor]:
    """The keys under whichever published prefix holds the most of `target`'s keys."""
    own = set(target.state_dict())

    def under(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

    return max((under(p) for p in PREFIXES), key=lambda s: len(own & set(s)))


@dataclass
class CTFMParams:
    init_filters: int = 32
    blocks_down: list[int] = field(default_factory=lambda: [1, 2, 2, 4, 4])
    hu_window: list[float] = field(default_factory=lambda: [-1024.0, 2048.0])
    orientation: str = "SPL"
    pretext_crops: int = 15  # sub-volumes per scan in the intra-sample contrast
    temperature: float = 0.1


class CTFMEncoder(nn.Module):
    def __init__(self, p: CTFMParams) -> None:
        super().__init__()
        self.window = hu_window(p.hu_window)
        self.orient = Reorient(p.orientation)
        self.net = SegResEncoder(spatial_dims=3, in_channels=1, init_filters=p.init_filters,
                                 blocks_down=tuple(p.blocks_down))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.orient(self.window(x)))[-1].mean(dim=(2, 3, 4))


def intra_sample_nt_xent(z0: torch.Tensor, z1: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B, K, D) projections of two views of K crops per scan: for each crop, its other view is the
    positive and both views of the scan's other K-1 crops are the negatives (CT-FM's loss, batched)."""
    z0, z1 = F.normalize(z0.float(), dim=-1), F.normalize(z1.float(), dim=-1)
    k = z0.shape[1]
    own = torch.eye(k, dtype=torch.bool, device=z0.device)
    positive = (z0 * z1).sum(-1, keepdim=True)
    negatives = torch.cat([(z0 @ z0.transpose(1, 2)).masked_fill(own, float("-inf")),
                           (z0 @ z1.transpose(1, 2)).masked_fill(own, float("-inf"))], dim=-1)
    logits = torch.cat([positive, negatives], dim=-1) / temperature
    return F.cross_entropy(logits.flatten(0, 1), torch.zeros(logits.shape[0] * k, dtype=torch.long,
                                                              device=logits.device))


class IntraSampleSimCLR(PretextTask):
    def __init__(self, encoder: CTFMEncoder, features: int, crops: int, temperature: float) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = nn.Sequential(nn.Linear(features, features), nn.ReLU(inplace=True), nn.Linear(features, 128))
        self.crops, self.temperature = crops, temperature
        self.views = TwoViews(min_scale=0.33)

    def pretrained_encoder(self) -> nn.Module:
        return self.encoder.net

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        b, edge = x.shape[0], x.shape[-1] // 2
        regions = torch.stack([random_cube(s, edge) for s in x for _ in range(self.crops)])  # (B*K, 1, e, e, e)
        v0, v1 = self.views(regions)
        z0, z1 = (self.projector(self.encoder(v)).view(b, self.crops, -1) for v in (v0, v1))
        return {"loss": intra_sample_nt_xent(z0, z1, self.temperature)}


@register_method("ctfm")
class CTFM(Method):
    description = "CT-FM SegResNetDS encoder, intra-sample SimCLR on 148k CTs (Pai et al., 2025)"
    regimes = ("scratch", "public", "public_to_vertebrae")
    Params = CTFMParams
    channels_last = True
    # The CPU presets' narrowed networks cannot load a CT-FM file, so they keep the harness's own
    # window (through CT-FM's the small network did not learn from scratch); LP-FT at `small` (Kumar et
    # al., ICLR 2022), without which a random head on the continued stand-in did not learn (measured:
    # docs/configuration.md, "Why the per-method presets").
    presets = {
        "tiny": {"model": {"init_filters": 4, "blocks_down": [1, 1, 1, 1], "pretext_crops": 3,
                           "hu_window": [-1000.0, 1000.0]}},
        "small": {"amp": True, "head_init": "linear_probe",
                  "model": {"init_filters": 8, "blocks_down": [1, 2, 2, 2], "pretext_crops": 4,
                            "hu_window": [-1000.0, 1000.0]}},
    }
    public_weights = WeightsSpec(
        filename="model.safetensors (project-lighter/ct_fm_feature_extractor)", url="", sha256="",
        hf_repo="project-lighter/ct_fm_feature_extractor", hf_file="model.safetensors",
        licence="Apache-2.0 (Hugging Face model card)", trained_on="148k CT scans (intrasample SimCLR)",
        layout="safetensors {'conv_init.weight', 'layers.{0-4}.blocks.*', 'layers.{1-4}.downsample.*'} or "
               "{'state_dict': {'backbone.[encoder.]<key>'}} or {'encoder.<key>', 'up_layers.*' (SegResNetDS)}",
        convert=convert_ctfm,
    )

    def cam_layer(self, model: nn.Module) -> str:
        """The last level's blocks, not their last convolution: a residual block adds its identity in
        place onto that convolution's output, which Grad-CAM's backward hook forbids."""
        return f"encoder.net.layers.{len(self.params.blocks_down) - 1}.blocks"

    def cam_to_input(self, cam: torch.Tensor) -> torch.Tensor:
        """Grad-CAM is taken in CT-FM's orientation (SPL): back to the crop's RAS."""
        return Reorient(self.params.orientation).undo(cam[:, None])[:, 0]

    def build_encoder(self) -> tuple[nn.Module, int]:
        p = self.params
        return CTFMEncoder(p), p.init_filters * 2 ** (len(p.blocks_down) - 1)

    def finetune_encoder(self, model: nn.Module) -> nn.Module:
        return model.encoder.net

    def layer_groups(self) -> dict:
        return {"stem": r"^encoder\.net\.conv_init", "blocks": r"^encoder\.net\.layers\.(\d+)"}

    def build_pretext(self, stage: str = "vertebrae") -> nn.Module:
        p = self.params
        if p.pretext_crops < 2:
            raise BenchError(f"bad value for 'model.pretext_crops': {p.pretext_crops}; expected >= 2 (the other "
                             f"crops of a scan are the negatives)")
        encoder, features = self.build_encoder()
        return IntraSampleSimCLR(encoder, features, p.pretext_crops, p.temperature)
