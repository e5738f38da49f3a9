"""VoCo (Wu et al., CVPR 2024; TPAMI): volume contrast pretraining of a MONAI Swin UNETR v2
encoder on large CT collections: `voco`.

Encoder: MONAI `SwinTransformer(use_v2=True)` (a residual convolution block before each stage),
feature size 48 / 96 / 192 for the B / L / H checkpoints (window 7, patch 2, depths 2-2-2-2, heads
3-6-12-24); finetuning pools the last stage globally into a linear head, as `swin_unetr` does.

Public checkpoints (`VoCo_{B,L,H}_SSL_head.pt`, `VoComni_{B,L,H}.pt`, Luffy03/VoCo and
Large-Scale-Medical). Layout confirmed in the published finetuning code (Luffy03/VoCo,
`Finetune/BTCV/main.py`, commit 6df5f92): a flat state dict of a whole `SwinUNETR`, sometimes
under `state_dict`, keys possibly prefixed `module.`, the encoder under `swinViT.` or `swin_vit.`;
that code loads it with `strict=False`, so a wrong prefix would load nothing silently. Here the
decoder keys are dropped and every encoder key must match (bench.weights.load_into).

VoCo's own pretext (base-crop contrast) is not implemented, so the regimes are `scratch` and
`public` (the latter needs `weights.public=PATH`).
"""
from __future__ import annotations

import torch
from torch import nn

from bench.methods.swin_unetr import SwinClassifier, SwinParams, SwinUNETR
from bench.registry import register_method
from bench.weights import WeightsSpec

ENCODER_PREFIXES = ("swinViT.", "swin_vit.")


def convert_voco(state: dict[str, torch.Tensor], target: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder tensors of a VoCo checkpoint (`module.` already stripped), named as MONAI's
    SwinTransformer names them; decoder and SSL-head keys are left out."""
    out = {}
    for key, value in state.items():
        prefix = next((p for p in ENCODER_PREFIXES if key.startswith(p)), None)
        if prefix is not None:
            out[key[len(prefix):]] = value
    return out


VOCO_WEIGHTS = WeightsSpec(
    filename="VoCo_B_SSL_head.pt",
    url="",  # the files sit on Hugging Face (Luffy503/VoCo); pass the downloaded file as weights.public
    sha256="",
    layout="{['state_dict':] {'[module.]swinViT|swin_vit.patch_embed.*', '...layers{1-4}.0.blocks.{0,1}.*', "
           "'...layers{1-4}c.0.*' (v2 residual blocks), 'encoder*/decoder*/out.*' (dropped)}}",
    convert=convert_voco,
)


@register_method("voco")
class VoCo(SwinClassifier):
    description = "VoCo volume-contrast Swin UNETR v2 encoder (public checkpoints B/L/H)"
    regimes = ("scratch", "public")
    Params = SwinParams  # feature size 48 (VoCo-B), 96 (L), 192 (H); window 7, depths 2-2-2-2, heads 3-6-12-24
    public_weights = VOCO_WEIGHTS
    presets = SwinUNETR.presets  # the CPU presets' sizes and recipe are swin_unetr's
    use_v2 = True
