"""SuPreM (Li et al., "How well do supervised 3D models transfer to medical imaging tasks?", ICLR
2024; AbdomenAtlas): supervised segmentation pretraining of 3D backbones on 9,262 annotated CTs:
`suprem` (the Swin UNETR backbone) and `suprem_unet` (the U-Net backbone).

Networks: the Swin UNETR encoder is MONAI's `SwinTransformer` (feature size 48, the same network
as `swin_unetr`); the U-Net is the Models Genesis UNet3D (`down_tr64` .. `down_tr512`, conv +
BatchNorm `bn1`), whose encoder `models_genesis` builds with the same key names. Finetuning pools
the last stage globally into a linear head.

Checkpoints, confirmed in MrGiovanni/SuPreM (commit 76e1a64; `supervised_pretraining/train.py`
saves them, `target_applications/totalsegmentator/train.py` loads them):
- `supervised_suprem_{swinunetr,unet}_2100.pth`: `{'net': state, 'optimizer', 'scheduler',
  'epoch'}` with the state of the whole universal model under DataParallel, keys
  `module.backbone.<backbone key>` (`*_backbone.pth` saves the backbone's own keys); the text and
  controller branches are dropped here.
- `self_supervised_nv_swin_unetr_50000.pth` (the MONAI self-supervised Swin weights SuPreM compares
  with): `{'model': state}` with `encoder.patch_embed.*` and `encoder.layers<k>.0.0.*` for MONAI's
  `swinViT.layers<k>.0.*`; `encoder.mask_token`, `encoder.norm.*` and `out.*` are not encoder keys.
Every tensor of the encoder must come from the file (bench.weights.load_into).

Preprocessing as SuPreM's: RAS orientation (the harness's own), intensities windowed to
[-175, 250] HU then scaled to [0, 1] (`model.hu_window`); voxels of 1.5 mm in pretraining.

Regimes `scratch` and `public` (supervised pretraining has no vertebra stage). `public` loads the
file given as `weights.public`; without one, the embedded stand-in pretrains as SuPreM did, in
miniature: the backbone with its segmentation decoder (MONAI's Swin UNETR; the U-Net's own
up-path), one output per organ of the body-CT corpus (bench.datasets.corpora.ORGANS), Dice +
cross-entropy (MONAI `DiceCELoss`, SuPreM's loss) on the corpus's organ label maps. The encoder's
tensors go on to finetuning; the decoder stays behind, as SuPreM's backbone files leave it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import nn

from bench.config import pretext_crop_size
from bench.datasets.corpora import ORGANS
from bench.errors import BenchError
from bench.methods.base import Method
from bench.methods.inputs import HUWindow, hu_window
from bench.methods.models_genesis import ENCODER_BLOCKS, GenesisEncoder, GenesisEncoderPooled, UNet3D, scaled_channels
from bench.methods.pretext import PretextTask
from bench.methods.swin_unetr import SwinClassifier, SwinEncoder, SwinParams, SwinUNETR, make_swin
from bench.registry import register_method
from bench.weights import WeightsSpec

SSL_STAGE = re.compile(r"^encoder\.(layers\d+)\.0\.0\.")


def convert_suprem(state: dict[str, torch.Tensor], target: nn.Module) -> dict[str, torch.Tensor]:
    """Either SuPreM layout (`module.` already stripped) -> the backbone encoder's own keys."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("backbone.")
        if key.startswith("swinViT."):
            out[key[len("swinViT."):]] = value
        elif SSL_STAGE.match(key):
            out[SSL_STAGE.sub(r"\1.0.", key)] = value
        elif key.startswith("encoder.patch_embed."):
            out[key[len("encoder."):]] = value
        elif key.startswith(ENCODER_BLOCKS):
            out[key] = value
    return out


SUPREM_LAYOUT = ("{'net': {'module.backbone.swinViT.*' (Swin UNETR) | 'module.backbone.down_tr{64,128,256,512}.*' "
                 "(U-Net), 'module.backbone.encoder*/decoder*', 'module.organ_embedding', 'module.controller.*', ...}, "
                 "'optimizer', 'scheduler', 'epoch'} or {'model': {'encoder.patch_embed.*', "
                 "'encoder.layers{1-4}.0.0.*', 'encoder.norm.*', 'encoder.mask_token', 'out.*'}}")


@dataclass
class SuPreMSwinParams(SwinParams):
    hu_window: list[float] = field(default_factory=lambda: [-175.0, 250.0])


class Windowed(nn.Module):
    """The checkpoint's intensity window in front of an encoder."""

    def __init__(self, window: HUWindow, encoder: nn.Module) -> None:
        super().__init__()
        self.window = window
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.window(x))


class OrganSegmentation(PretextTask):
    """The supervised stand-in's pretext: the checkpoint's intensity window, a segmentation network
    with one logit map per organ, and Dice + cross-entropy against the organ labels. `encoder`
    names the network's encoder module (Swin UNETR's `swinViT`); without one (the U-Net, whose
    encoder is a set of blocks) the tensors that reach the classifier are those of `encoder_blocks`.
    Crops are padded to a multiple of `multiple` (Swin UNETR's decoder: 32; the U-Net's three
    poolings: 8), and the padding carries no label."""

    def __init__(self, window: HUWindow, network: nn.Module, encoder: str = "",
                 encoder_blocks: tuple[str, ...] = (), multiple: int = 32) -> None:
        super().__init__()
        self.window = window
        self.network = network
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True)
        self.encoder_name, self.encoder_blocks, self.multiple = encoder, encoder_blocks, multiple

    def pretrained_encoder(self) -> nn.Module:
        if not self.encoder_name:
            raise BenchError("the SuPreM U-Net's pretext has no encoder module (its public stage is the file itself)")
        return self.network.get_submodule(self.encoder_name)

    def encoder_state(self) -> dict[str, torch.Tensor]:
        if self.encoder_name:
            return self.pretrained_encoder().state_dict()
        return {k: v for k, v in self.network.state_dict().items() if k.startswith(self.encoder_blocks)}

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, organs = batch
        size = x.shape[-3:]
        pad = [(-n) % self.multiple for n in size]
        windowed = F.pad(self.window(x), [p for n in reversed(pad) for p in (0, n)])
        logits = self.network(windowed)[..., :size[0], :size[1], :size[2]].float()  # the padding carries no label
        return {"loss": self.loss(logits, organs[:, None])}


def swin_segmentation(p, crop_size: int) -> nn.Module:
    """MONAI's Swin UNETR around the classifier's own Swin encoder (`swinViT`). Its decoder normalises
    by instance, as SuPreM's, where the bottleneck has more than one voxel; a crop padded to 32^3
    leaves it one, which instance norm cannot train on, so the (discarded) decoder normalises by
    batch there. The pretext pads a crop to the next multiple of 32 (OrganSegmentation)."""
    from monai.networks.nets import SwinUNETR as SwinUNETRNet

    network = SwinUNETRNet(in_channels=1, out_channels=len(ORGANS), feature_size=p.feature_size,
                           depths=tuple(p.depths), num_heads=tuple(p.num_heads), window_size=p.window_size,
                           norm_name="instance" if crop_size > 32 else "batch")
    network.swinViT = make_swin(p)
    return network


@register_method("suprem")
class SuPreM(SwinClassifier):
    description = "SuPreM supervised Swin UNETR backbone, AbdomenAtlas (Li et al., ICLR 2024)"
    regimes = ("scratch", "public")
    Params = SuPreMSwinParams
    presets = SwinUNETR.presets  # the CPU presets' sizes and recipe are swin_unetr's
    public_weights = WeightsSpec(filename="supervised_suprem_swinunetr_2100.pth",
                                 url="https://www.dropbox.com/scl/fi/gd1d7k9mac5azpwurds66/supervised_suprem_swinunetr_"
                                     "2100.pth?rlkey=xoqr7ey52rnese2k4hwmrlqrt&dl=1",
                                 sha256="", layout=SUPREM_LAYOUT, convert=convert_suprem,
                                 licence="unverified here (see MrGiovanni/SuPreM)",
                                 trained_on="AbdomenAtlas (supervised organ segmentation)")

    def build_encoder(self) -> tuple[nn.Module, int]:
        _, features = super().build_encoder()  # checks the crop size
        encoder = SwinEncoder(make_swin(self.params))
        return Windowed(hu_window(self.params.hu_window), encoder), features

    def finetune_encoder(self, model: nn.Module) -> nn.Module:
        return model.encoder.encoder.swin

    def pretext_data_kind(self, stage: str) -> str | None:
        return "segmentation" if stage == "public" else None

    def build_pretext(self, stage: str = "public") -> nn.Module:
        edge = pretext_crop_size(self.cfg)
        self.check_edge(edge, "pretrain.crop_size")
        return OrganSegmentation(hu_window(self.params.hu_window), swin_segmentation(self.params, edge), "swinViT")

    def cam_layer(self, model: nn.Module) -> str:
        return "encoder.encoder.swin.layers4.0"

    def layer_groups(self) -> dict:
        return {"stem": r"^encoder\.encoder\.swin\.patch_embed", "blocks": r"^encoder\.encoder\.swin\.layers(\d)"}


@dataclass
class SuPreMUNetParams:
    width: float = 1.0  # the public weights need 1.0; the CPU presets narrow every channel count
    hu_window: list[float] = field(default_factory=lambda: [-175.0, 250.0])


@register_method("suprem_unet")
class SuPreMUNet(Method):
    description = "SuPreM supervised U-Net (UNet3D) backbone, AbdomenAtlas (Li et al., ICLR 2024)"
    regimes = ("scratch", "public")
    Params = SuPreMUNetParams
    channels_last = True
    pretext_any_size = True  # fully convolutional: its pretext may see sub-crops (edges a multiple of 8)
    # at `small` the stand-in segments 32^3 sub-crops at the run's spacing, as the Swin methods' pretexts do
    presets = {"tiny": {"model": {"width": 0.125}},
               "small": {"amp": True, "pretrain": {"crop_size": 32}, "model": {"width": 0.125}}}
    public_weights = WeightsSpec(filename="supervised_suprem_unet_2100.pth", url="", sha256="",
                                 layout=SUPREM_LAYOUT, convert=convert_suprem,
                                 licence="unverified here (see MrGiovanni/SuPreM)",
                                 trained_on="AbdomenAtlas (supervised organ segmentation)")

    def build_encoder(self) -> tuple[nn.Module, int]:
        encoder = GenesisEncoder(self.params.width)
        features = scaled_channels(512, self.params.width)
        return Windowed(hu_window(self.params.hu_window), GenesisEncoderPooled(encoder)), features

    def finetune_encoder(self, model: nn.Module) -> nn.Module:
        return model.encoder.encoder.encoder

    def pretext_data_kind(self, stage: str) -> str | None:
        return "segmentation" if stage == "public" else None

    def build_pretext(self, stage: str = "public") -> nn.Module:
        network = UNet3D(self.params.width)
        out_channels = scaled_channels(64, self.params.width)
        network.out_tr = nn.Conv3d(out_channels, len(ORGANS), kernel_size=1)  # a logit per organ
        return OrganSegmentation(hu_window(self.params.hu_window), network, encoder_blocks=ENCODER_BLOCKS, multiple=8)
