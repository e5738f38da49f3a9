"""ViT UNETR self-supervised pretraining (MONAI tutorial `vit_unetr_ssl`): `vit_unetr` (Table 3).

Pretext: MONAI `ViTAutoEnc` reconstructs the original volume from two differently corrupted views
(coarse dropout of small holes, coarse "outer" dropout, coarse shuffle); loss = L1 reconstruction +
contrastive loss (temperature 0.05) between the two views' reconstructions x L1 reconstruction, as
the tutorial computes it. Finetuning: MONAI `ViT` (same encoder keys) with a cls token, whose
normalised cls token feeds the linear head. The loader accepts MONAI ViT checkpoints from any MONAI
version: `module.` prefixes, nested dicts, MONAI 1.4/1.5 `cross_attn` keys (dropped), decoder keys
(dropped), position embeddings resized to the run's token grid.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.nets import ViT, ViTAutoEnc
from monai.transforms import Compose, RandCoarseDropout, RandCoarseShuffle
from monai.utils import convert_to_tensor
from pytorch_metric_learning.losses import NTXentLoss
from torch import nn

from bench.config import pretrain_seed
from bench.methods.base import Method
from bench.methods.pretext import PretextTask
from bench.methods.recipes import TRANSFORMER_FINETUNE
from bench.registry import register_method
from bench.weights import WeightsSpec, resize_pos_embed_3d


def convert_monai_vit(state: dict[str, torch.Tensor], target: nn.Module) -> dict[str, torch.Tensor]:
    own = target.state_dict()
    out = {}
    for key, value in state.items():
        if ".cross_attn." in key and key not in own:
            continue  # MONAI 1.4/1.5 always built a cross-attention block; unused here
        if key == "patch_embedding.position_embeddings" and key in own and own[key].shape != value.shape:
            side = round(own[key].shape[1] ** (1 / 3))
            value = resize_pos_embed_3d(value, (side,) * 3, prefix_tokens=0)
        if key.startswith(("conv3d_transpose", "classification_head")):
            continue  # ViTAutoEnc decoder, or another task's head
        out[key] = value
    return out


class ViTEncoder(nn.Module):
    """MONAI ViT with a cls token; returns the normalised cls token (B, hidden)."""

    def __init__(self, vit: ViT) -> None:
        super().__init__()
        self.vit = vit
        vit.classification_head = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(x)[0]


class ViTAutoEncSSL(PretextTask):
    def __init__(self, autoenc: ViTAutoEnc, crop: int, temperature: float, seed: int) -> None:
        super().__init__()
        self.encoder = autoenc
        s = crop
        self.corrupt = Compose([
            RandCoarseDropout(prob=1.0, holes=6, spatial_size=max(1, s // 19), dropout_holes=True,
                              max_spatial_size=max(2, s // 3)),
            RandCoarseDropout(prob=1.0, holes=6, spatial_size=max(2, s // 5), dropout_holes=False,
                              max_spatial_size=max(3, 2 * s // 3)),
            RandCoarseShuffle(prob=0.8, holes=10, spatial_size=max(1, s // 12)),
        ])
        self.corrupt.set_random_state(seed=seed)
        # The tutorial's MONAI ContrastiveLoss broadcasts a (2B, 2B, D) tensor, D being a whole flattened
        # reconstruction; the same NT-Xent (tested equal) from pytorch-metric-learning takes one
        # (2B, D) x (D, 2B) product.
        self.contrastive = NTXentLoss(temperature=temperature)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        views = []
        for _ in range(2):
            corrupted = [convert_to_tensor(self.corrupt(s.cpu()),
                                           track_meta=False) for s in x.float()]  # no MetaTensors
            views.append(torch.stack(corrupted).to(x.device, x.dtype))
        out1, out2 = self.encoder(views[0])[0], self.encoder(views[1])[0]
        recon = F.l1_loss(out1.float(), x.float())
        contrast = self.contrast(out1, out2)
        return {"loss": recon + contrast * recon, "l1": recon, "contrastive": contrast}

    def contrast(self, out1: torch.Tensor, out2: torch.Tensor) -> torch.Tensor:
        """NT-Xent between the flattened reconstructions; sample i of both views is a positive pair."""
        pairs = torch.arange(len(out1), device=out1.device).repeat(2)
        return self.contrastive(torch.cat([out1.flatten(1), out2.flatten(1)]).float(), pairs)


@dataclass
class ViTUNETRParams:
    patch_size: int = 16  # ViTAutoEnc needs a square number
    hidden_size: int = 768
    mlp_dim: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    temperature: float = 0.05


MONAI_VIT_WEIGHTS = WeightsSpec(
    filename="(MONAI ViT / ViTAutoEnc checkpoint)", url="", sha256="",
    layout="patch_embedding.{position_embeddings, patch_embeddings}, blocks.i.{norm1, attn.qkv, attn.out_proj, "
           "norm2, mlp.linear1, mlp.linear2}, norm; MONAI 1.4/1.5 add blocks.i.cross_attn.*",
    convert=convert_monai_vit,
)


@register_method("vit_unetr")
class ViTUNETR(Method):
    architecture = "transformer"
    description = "MONAI ViTAutoEnc SSL (two views, L1 + contrastive), ViT-B encoder (Table 3)"
    regimes = ("scratch", "public", "public_to_vertebrae")
    Params = ViTUNETRParams
    public_weights = MONAI_VIT_WEIGHTS
    presets = {
        "tiny": {"lr": 1.0e-3, "model": {"hidden_size": 48, "mlp_dim": 96, "num_layers": 2, "num_heads": 2}},
        "small": {**TRANSFORMER_FINETUNE,
                  "model": {"hidden_size": 192, "mlp_dim": 768, "num_layers": 6, "num_heads": 3}},
    }

    def _kw(self) -> dict:
        p = self.params
        return dict(in_channels=1, img_size=self.cfg.crop_size, patch_size=p.patch_size, hidden_size=p.hidden_size,
                    mlp_dim=p.mlp_dim, num_layers=p.num_layers, num_heads=p.num_heads)

    def build_encoder(self) -> tuple[nn.Module, int]:
        return ViTEncoder(ViT(**self._kw(), classification=True, num_classes=2,
                              post_activation=None)), self.params.hidden_size

    def build_pretext(self, stage: str = "vertebrae") -> nn.Module:
        return ViTAutoEncSSL(ViTAutoEnc(**self._kw()), self.cfg.crop_size, self.params.temperature,
                             pretrain_seed(self.cfg))

    def finetune_encoder(self, model: nn.Module) -> nn.Module:
        return model.encoder.vit

    def token_layout(self) -> tuple[int, tuple[int, ...], str]:
        return 1, (self.cfg.crop_size // self.params.patch_size,) * 3, "cls"

    def layer_groups(self) -> dict:
        return {"stem": r"^encoder\.vit\.(?:cls_token|patch_embedding)", "blocks": r"^encoder\.vit\.blocks\.(\d+)"}

    def optional_encoder_keys(self) -> tuple[str, ...]:
        return ("cls_token",)  # ViTAutoEnc has no cls token: the classifier's starts at random
