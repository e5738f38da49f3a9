"""Swin UNETR self-supervised pretraining (Tang et al. 2022): `swin_unetr` (Table 3).

Encoder: MONAI `SwinTransformer` (feature size 48, window 7, patch 2, depths 2-2-2-2, heads
3-6-12-24 at the paper preset). Pretext on two augmented views of each volume (a random rotation
by 0/90/180/270 degrees in the axial plane, then random cut-out boxes): rotation prediction (4
classes), contrastive NT-Xent (temperature 0.5) between the two views' 512-d embeddings, and L1
inpainting of the rotated original by a transposed-convolution decoder; each loss weighs 1.
Finetuning: the encoder, global average pooling of its last stage, a linear head.

The public `model_swinvit.pt` keeps its weights under `state_dict` with `module.` prefixes and
names the MLP layers `mlp.fc1` / `mlp.fc2` where MONAI says `mlp.linear1` / `mlp.linear2`: a rename
plus `strict=False` loads nothing silently, so every encoder key must be matched here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from monai.losses import ContrastiveLoss
from monai.networks.nets.swin_unetr import SwinTransformer
from torch import nn

from bench.config import pretext_crop_size
from bench.methods.base import Method
from bench.methods.pretext import PretextTask
from bench.methods.recipes import TRANSFORMER_FINETUNE
from bench.registry import register_method
from bench.weights import WeightsSpec


def convert_swinvit(state: dict[str, torch.Tensor], target: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if key.startswith("swinViT."):
            key = key[len("swinViT."):]
        key = key.replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2.")
        out[key] = value
    return out


SWINVIT_WEIGHTS = WeightsSpec(
    filename="model_swinvit.pt",
    url="https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/model_swinvit.pt",
    sha256="",
    layout="{'state_dict': {'module.patch_embed.*', 'module.layers{1-4}.0.blocks.{0,1}.{norm1, "
           "attn.relative_position_bias_table, attn.relative_position_index, attn.qkv, attn.proj, norm2, "
           "mlp.fc1, mlp.fc2}', 'module.layers{k}.0.downsample.*'}}",
    convert=convert_swinvit,
    licence="Apache-2.0 (MONAI)", trained_on="5,050 CT scans (Swin UNETR SSL)",
)


def make_swin(p, use_v2: bool = False) -> SwinTransformer:
    """MONAI's Swin encoder. Without gradients (features, evaluation) its windows attend through
    PyTorch's fused attention, which MONAI offers for inference: the same function of the same
    weights, without the many small products and the separate softmax of its training path."""
    return SwinTransformer(in_chans=1, embed_dim=p.feature_size, window_size=(p.window_size,) * 3,
                           patch_size=(2, 2, 2), depths=tuple(p.depths), num_heads=tuple(p.num_heads),
                           spatial_dims=3, use_v2=use_v2, use_checkpoint=p.grad_checkpointing,
                           use_flash_attention=True)


class SwinEncoder(nn.Module):
    def __init__(self, swin: SwinTransformer) -> None:
        super().__init__()
        self.swin = swin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.swin(x)[4].mean(dim=(2, 3, 4))


def fit_to(decoded: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A x32 decoder's output cut to the input's size: Swin's patch merging pads an odd stage on its
    far side (48 -> 24, 12, 6, 3 -> 2), so the decoded volume overhangs there and its near corner is
    aligned with the input's."""
    d, h, w = x.shape[-3:]
    return decoded[..., :d, :h, :w]


def _rotate(x: torch.Tensor, k: int) -> torch.Tensor:
    return torch.rot90(x, k, dims=(1, 2))  # (C, X, Y, Z): rotation in the axial (X-Y) plane


def _cutout(x: torch.Tensor) -> torch.Tensor:
    out = x.clone()
    size = x.shape[-1]
    for _ in range(int(torch.randint(1, 5, ()))):
        edge = int(torch.randint(max(1, size // 8), max(2, size // 4), ()))
        start = [int(torch.randint(0, size - edge + 1, ())) for _ in range(3)]
        out[:, start[0]:start[0] + edge, start[1]:start[1] + edge, start[2]:start[2] + edge] = 0
    return out


class SwinSSL(PretextTask):
    def __init__(self, swin: SwinTransformer, feature_size: int) -> None:
        super().__init__()
        self.encoder = swin
        dim = 16 * feature_size
        self.rotation_head = nn.Linear(dim, 4)
        self.contrastive_head = nn.Linear(dim, 512)
        chans = [dim, dim // 2, dim // 4, dim // 8, dim // 16, dim // 16]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.ConvTranspose3d(cin, cout, 2, stride=2), nn.InstanceNorm3d(cout), nn.LeakyReLU()]
        self.decoder = nn.Sequential(*layers, nn.Conv3d(chans[-1], 1, 1))
        self.contrastive = ContrastiveLoss(temperature=0.5)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        rot_loss = recon_loss = 0.0
        embeddings = []
        for _ in range(2):
            ks = torch.randint(0, 4, (len(x),))
            rotated = torch.stack([_rotate(s, int(k)) for s, k in zip(x, ks)])
            corrupted = torch.stack([_cutout(s) for s in rotated])
            deep = self.encoder(corrupted)[4]
            pooled = deep.mean(dim=(2, 3, 4))
            rot_loss = rot_loss + F.cross_entropy(self.rotation_head(pooled).float(), ks.to(x.device))
            embeddings.append(self.contrastive_head(pooled).float())
            recon_loss = recon_loss + F.l1_loss(fit_to(self.decoder(deep), rotated).float(), rotated.float())
        contrast = self.contrastive(embeddings[0], embeddings[1])
        rot_loss, recon_loss = rot_loss / 2, recon_loss / 2
        return {"loss": rot_loss + contrast + recon_loss, "rotation": rot_loss, "contrastive": contrast,
                "inpainting": recon_loss}


@dataclass
class SwinParams:
    feature_size: int = 48
    window_size: int = 7
    depths: list[int] = field(default_factory=lambda: [2, 2, 2, 2])
    num_heads: list[int] = field(default_factory=lambda: [3, 6, 12, 24])
    grad_checkpointing: bool = False  # activation checkpointing in the Swin blocks (MONAI's): less memory, more compute


class SwinClassifier(Method):
    """What every MONAI-Swin-encoder method shares: the encoder with a pooled linear head, the
    module that receives pretrained weights, Grad-CAM's layer and the layer-decay groups."""
    architecture = "transformer"

    use_v2: bool = False

    checkpoint_pattern = None  # MONAI's SwinTransformer checkpoints its own blocks (make_swin)
    pretext_any_size = True  # windowed attention with relative positions: a pretext may see smaller crops

    def check_edge(self, edge: int, key: str = "crop_size") -> None:
        """Swin's four x2 patch mergings after a x2 patch embedding want an edge of 32 or more."""
        if edge % 16 or edge < 32:
            from bench.errors import BenchError

            raise BenchError(f"bad value for '{key}': {edge}; {self.name} needs a multiple of 16 and at least 32")

    def build_encoder(self) -> tuple[nn.Module, int]:
        self.check_edge(self.cfg.crop_size)
        return SwinEncoder(make_swin(self.params, self.use_v2)), 16 * self.params.feature_size

    def finetune_encoder(self, model: nn.Module) -> nn.Module:
        return model.encoder.swin

    def cam_layer(self, model: nn.Module) -> str:
        """Window attention has no global map: Grad-CAM on the last stage's 5D output (its BasicLayer:
        the `layers4` ModuleList itself is never called, so a hook on it never fires)."""
        return "encoder.swin.layers4.0"

    def layer_groups(self) -> dict:
        """Patch embedding, then the four stages (each with its patch merging, and v2's residual block)."""
        return {"stem": r"^encoder\.swin\.patch_embed", "blocks": r"^encoder\.swin\.layers(\d)"}


@register_method("swin_unetr")
class SwinUNETR(SwinClassifier):
    description = "MONAI Swin encoder SSL (rotation + contrastive + inpainting) (Table 3)"
    regimes = ("scratch", "public", "public_to_vertebrae")
    Params = SwinParams
    public_weights = SWINVIT_WEIGHTS
    # The CPU presets see the preset's crop like every other method (the encoder pads an odd last
    # stage, the SSL decoder's output is cut to the input); at `small` their pretexts see 32^3
    # sub-crops at the same spacing (as Swin UNETR's SSL pretrains on sub-crops of its scans). They
    # keep 12 channels per head: the paper's head count at feature size 12 (4 channels per head)
    # spends most of a step in small attention products and softmax.
    presets = {
        "tiny": {"model": {"feature_size": 12, "window_size": 4, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8]}},
        "small": {**TRANSFORMER_FINETUNE, "amp": True, "pretrain": {"crop_size": 32},
                  "model": {"feature_size": 12, "window_size": 4, "num_heads": [1, 2, 4, 8]}},
    }

    def build_pretext(self, stage: str = "vertebrae") -> nn.Module:
        self.check_edge(pretext_crop_size(self.cfg), "pretrain.crop_size")
        return SwinSSL(make_swin(self.params), self.params.feature_size)
