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
1000 HU, so brighter bone stays at that value. CT-FM's SimCLR pretext is not reproduced here, so
the regimes are `scratch` and `public`, the latter with `weights.public=PATH`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from monai.networks.nets.segresnet_ds import SegResEncoder
from torch import nn

from bench.methods.base import Method
from bench.methods.inputs import Reorient, hu_window
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


class CTFMEncoder(nn.Module):
    def __init__(self, p: CTFMParams) -> None:
        super().__init__()
        self.window = hu_window(p.hu_window)
        self.orient = Reorient(p.orientation)
        self.net = SegResEncoder(spatial_dims=3, in_channels=1, init_filters=p.init_filters,
                                 blocks_down=tuple(p.blocks_down))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.orient(self.window(x)))[-1].mean(dim=(2, 3, 4))


@register_method("ctfm")
class CTFM(Method):
    description = "CT-FM SegResNetDS encoder, intra-sample SimCLR on 148k CTs (Pai et al., 2025)"
    regimes = ("scratch", "public")
    Params = CTFMParams
    channels_last = True
    presets = {
        "tiny": {"model": {"init_filters": 4, "blocks_down": [1, 1, 1, 1]}},
        "small": {"amp": True, "model": {"init_filters": 8, "blocks_down": [1, 2, 2, 2]}},
    }
    public_weights = WeightsSpec(
        filename="model.safetensors (project-lighter/ct_fm_feature_extractor)", url="", sha256="",
        layout="safetensors {'conv_init.weight', 'layers.{0-4}.blocks.*', 'layers.{1-4}.downsample.*'} or "
               "{'state_dict': {'backbone.[encoder.]<key>'}} or {'encoder.<key>', 'up_layers.*' (SegResNetDS)}",
        convert=convert_ctfm,
    )

    def build_encoder(self) -> tuple[nn.Module, int]:
        p = self.params
        return CTFMEncoder(p), p.init_filters * 2 ** (len(p.blocks_down) - 1)

    def finetune_encoder(self, model: nn.Module) -> nn.Module:
        return model.encoder.net

    def layer_groups(self) -> dict:
        return {"stem": r"^encoder\.net\.conv_init", "blocks": r"^encoder\.net\.layers\.(\d+)"}
