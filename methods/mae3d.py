"""3D MAE (He et al. 2022, adapted to volumes): `mae3d`, regimes scratch and vertebrae (Table 3).

Pretext: mask 75 % of the cubic patches per sample (argsort of uniform noise), encode ONLY the
visible ones with the ViT3D encoder, decode all with a narrow transformer (mask tokens at the
hidden positions), and regress the voxels of the masked patches (MSE on masked patches only,
targets optionally normalised per patch; only the masked patches are predicted at all).
Finetuning keeps the encoder and reads the cls token.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from bench.methods.pretext import MaskedReconstruction
from bench.methods.vit import VIT_PRESETS, ViT3D, ViTMethod, ViTParams, init_linear, patchify, take, unpatchify
from bench.registry import register_method


class Masking(NamedTuple):
    keep: torch.Tensor  # (B, k) visible patches
    hidden: torch.Tensor  # (B, n - k) masked patches
    restore: torch.Tensor  # (B, n): where each patch sits in cat([visible, hidden])
    mask: torch.Tensor  # (B, n), 1 = hidden


def random_masking(batch: int, tokens: int, ratio: float, device: torch.device) -> Masking:
    """Per-sample random masking by the argsort of uniform noise; every sample hides as many patches."""
    keep_n = max(1, int(round(tokens * (1 - ratio))))
    noise = torch.rand(batch, tokens, device=device)
    shuffle = torch.argsort(noise, dim=1)
    restore = torch.argsort(shuffle, dim=1)
    mask = torch.ones(batch, tokens, device=device)
    mask[:, :keep_n] = 0
    return Masking(shuffle[:, :keep_n], shuffle[:, keep_n:], restore, torch.gather(mask, 1, restore))


def unshuffle(visible: torch.Tensor, mask_token: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
    """(B, 1 + k, C) cls + visible tokens -> (B, 1 + n, C) with `mask_token` at the hidden positions."""
    b, n = restore.shape
    patches = torch.cat([visible[:, 1:], mask_token.expand(b, n + 1 - visible.shape[1], -1)], dim=1)
    return torch.cat([visible[:, :1], take(patches, restore)], dim=1)


def masked_patch_loss(pred: torch.Tensor, target: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """MSE over the hidden patches, (B, h, P) each; with `norm_pix` every target patch is normalised
    by its own mean and (unbiased) variance, as MAE does. Predicting and scoring only the hidden
    patches gives MAE's loss (the visible ones have weight 0) without the 4096-wide prediction of
    every visible 16^3 patch."""
    target = target.float()
    if norm_pix:  # (t - mean) / sqrt(var_unbiased + eps) as one layer-norm kernel instead of var_mean
        n = target.shape[-1]  # and three elementwise ops: var_unbiased = var / c^2 with c^2 = (n - 1) / n,
        c2 = (n - 1) / n  # so the target is c * LN(t, eps * c^2), and c is the norm's weight
        weight = torch.full((n,), c2**0.5, dtype=target.dtype, device=target.device)
        target = F.layer_norm(target, (n,), weight=weight, eps=1e-6 * c2)
    return F.mse_loss(pred.float(), target)


class MAE3D(MaskedReconstruction):
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
            module.apply(init_linear)

    def encode(self, patches: torch.Tensor, masking: Masking) -> torch.Tensor:
        """(B, n, P) patches -> (B, 1 + n, decoder_dim) decoder input: the encoder sees the visible
        patches only, mask tokens fill the hidden positions."""
        latent = self.decoder_embed(self.encoder.forward_patches(patches, masking.keep))
        return unshuffle(latent, self.mask_token, masking.restore) + self.decoder_pos_embed

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        patches = patchify(x, self.encoder.patch_size)  # the encoder's input and the loss target
        masking = random_masking(len(x), self.encoder.num_patches, self.mask_ratio, x.device)
        tokens = self.encode(patches, masking)
        for block in self.decoder_blocks:
            tokens = block(tokens)
        pred = self.decoder_pred(self.decoder_norm(take(tokens[:, 1:], masking.hidden)))
        return {"loss": masked_patch_loss(pred, take(patches, masking.hidden), self.norm_pix_loss)}


    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked input, reconstruction) of a batch, both (B, 1, D, H, W): the hidden patches blanked,
        and the visible patches kept with the decoder's prediction at the hidden ones. Normalised-pixel
        predictions are mapped back with each target patch's own mean and variance, as MAE's
        visualisation does."""
        p = self.encoder.patch_size
        patches = patchify(x, p)
        masking = random_masking(len(x), self.encoder.num_patches, self.mask_ratio, x.device)
        tokens = self.encode(patches, masking)
        for block in self.decoder_blocks:
            tokens = block(tokens)
        pred = self.decoder_pred(self.decoder_norm(take(tokens[:, 1:], masking.hidden))).float()
        if self.norm_pix_loss:
            target = take(patches, masking.hidden).float()
            var, mean = torch.var_mean(target, dim=-1, keepdim=True)
            pred = pred * (var + 1e-6).sqrt() + mean
        b, n, size = patches.shape
        rows = (masking.hidden + torch.arange(b, device=x.device).unsqueeze(1) * n).reshape(-1)
        full = patches.float().reshape(b * n, size).index_copy(0, rows, pred.reshape(-1, size))
        masked = patches.float().reshape(b * n, size).index_fill(0, rows, 0.0)
        grid = (x.shape[2] // p, x.shape[3] // p, x.shape[4] // p)
        return unpatchify(masked.view(b, n, size), p, grid), unpatchify(full.view(b, n, size), p, grid)


@dataclass
class MAE3DParams(ViTParams):
    mask_ratio: float = 0.75
    decoder_dim: int = 512
    decoder_depth: int = 8  # "decoder as in MAE": 512 wide, 8 blocks, 16 heads
    decoder_heads: int = 16
    norm_pix_loss: bool = True
    drop_path: float = 0.1


@register_method("mae3d")
class MAE3DMethod(ViTMethod):
    description = "3D MAE (ViT-B encoder, mask 0.75) on unlabelled vertebrae (Table 3)"
    regimes = ("scratch", "vertebrae")
    Params = MAE3DParams
    presets = {
        "tiny": {**VIT_PRESETS["tiny"], "model": {**VIT_PRESETS["tiny"]["model"], "decoder_dim": 32,
                                                  "decoder_depth": 1, "decoder_heads": 2}},
        "small": {**VIT_PRESETS["small"], "model": {**VIT_PRESETS["small"]["model"], "decoder_dim": 128,
                                                    "decoder_depth": 2, "decoder_heads": 4}},
        "paper": {"pretrain": {"lr": 3.125e-5, "min_lr": 3.125e-7}},  # 1e-3 x batch 8 / 256 (MAE linear scaling rule)
    }

    def build_pretext(self, stage: str = "vertebrae") -> nn.Module:
        p = self.params
        return MAE3D(self.make_vit(), p.decoder_dim, p.decoder_depth, p.decoder_heads, p.mask_ratio, p.norm_pix_loss)
