"""3D MAE (He et al. 2022, adapted to volumes): `mae3d`, regimes scratch and vertebrae (Table 3).

Pretext: mask 75 % of the cubic patches per sample (argsort of uniform noise), encode ONLY the
visible ones with the ViT3D encoder, decode all with a narrow transformer (mask tokens at the
hidden positions), and regress the voxels of the masked patches (MSE on masked patches only,
targets optionally normalised per patch). Finetuning keeps the encoder and reads the cls token.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from bench.methods.vit import VIT_PRESETS, ViT3D, ViTMethod, ViTParams, _init_linear, patchify
from bench.registry import register_method


def random_masking(batch: int, tokens: int, ratio: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking: (keep indices, restore order, mask with 1 = hidden)."""
    keep_n = max(1, int(round(tokens * (1 - ratio))))
    noise = torch.rand(batch, tokens, device=device)
    shuffle = torch.argsort(noise, dim=1)
    restore = torch.argsort(shuffle, dim=1)
    keep = shuffle[:, :keep_n]
    mask = torch.ones(batch, tokens, device=device)
    mask[:, :keep_n] = 0
    return keep, restore, torch.gather(mask, 1, restore)


class MAE3D(nn.Module):
    def __init__(self, encoder: ViT3D, decoder_dim: int, decoder_depth: int, decoder_heads: int,
                 mask_ratio: float, norm_pix_loss: bool, in_chans: int = 1) -> None:
        super().__init__()
        self.encoder = encoder
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        n, p = encoder.num_patches, encoder.patch_size
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, 1 + n, decoder_dim))
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.decoder_blocks = nn.ModuleList(Block(decoder_dim, decoder_heads, 4.0, qkv_bias=True, norm_layer=norm)
                                            for _ in range(decoder_depth))
        self.decoder_norm = norm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, p**3 * in_chans)
        trunc_normal_(self.mask_token, std=0.02)
        trunc_normal_(self.decoder_pos_embed, std=0.02)
        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            module.apply(_init_linear)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        b = x.shape[0]
        n = self.encoder.num_patches
        keep, restore, mask = random_masking(b, n, self.mask_ratio, x.device)
        latent = self.encoder.forward_tokens(x, keep)  # visible tokens only
        tokens = self.decoder_embed(latent)
        hidden = self.mask_token.expand(b, n - keep.shape[1], -1)
        patches = torch.cat([tokens[:, 1:], hidden], dim=1)
        patches = torch.gather(patches, 1, restore.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        tokens = torch.cat([tokens[:, :1], patches], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            tokens = block(tokens)
        pred = self.decoder_pred(self.decoder_norm(tokens))[:, 1:]
        target = patchify(x, self.encoder.patch_size)
        if self.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = ((pred.float() - target.float()) ** 2).mean(-1)
        loss = (per_patch * mask).sum() / mask.sum()
        return {"loss": loss}


@dataclass
class MAE3DParams(ViTParams):
    mask_ratio: float = 0.75
    decoder_dim: int = 512
    decoder_depth: int = 4
    decoder_heads: int = 16
    norm_pix_loss: bool = True
    drop_path: float = 0.1


@register_method("mae3d")
class MAE3DMethod(ViTMethod):
    description = "3D MAE (ViT-B encoder, mask 0.75) on unlabelled vertebrae (Table 3)"
    regimes = ("scratch", "vertebrae")
    pretext_input = "volume"
    Params = MAE3DParams
    presets = {
        "tiny": {**VIT_PRESETS["tiny"], "model": {**VIT_PRESETS["tiny"]["model"], "decoder_dim": 32,
                                                  "decoder_depth": 1, "decoder_heads": 2}},
        "small": {**VIT_PRESETS["small"], "model": {**VIT_PRESETS["small"]["model"], "decoder_dim": 128,
                                                    "decoder_depth": 2, "decoder_heads": 4}},
        "paper": {"pretrain": {"lr": 3.125e-5}},  # 1e-3 x batch 8 / 256 (MAE linear scaling rule)
    }

    def build_pretext(self) -> nn.Module:
        p = self.params
        return MAE3D(self.make_vit(), p.decoder_dim, p.decoder_depth, p.decoder_heads, p.mask_ratio, p.norm_pix_loss)
