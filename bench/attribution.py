"""Where a classifier looks: attribution maps of its fracture logit, in the input's frame and then
in the crop's.

- `gradcam`: Grad-CAM on a convolutional stage (MONAI `GradCAM`, 3D and video inputs alike);
- `occlusion`: occlusion sensitivity (MONAI `OcclusionSensitivity`), for every method: the drop
  of the fracture probability when a region is blurred away;
- `attention_rollout` (Abnar & Zuidema 2020) over all blocks and `last_attention` of the last block,
  for transformers: attention probabilities taken through the libraries' own hooks (timm's
  `AttentionExtract` with the fused kernel off; MONAI's `save_attn`), mapped from tokens to voxels.

Maps are non-negative and come back in the frame of the model input; `to_crop` takes them to the
frame of the stored crop (slice methods: each crop slice takes the map of its nearest frame).
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.datasets import views


def last_conv_layer(model: nn.Module) -> str | None:
    """The name of the model's last 3D convolution: the default Grad-CAM layer of a conv net."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Conv3d)]
    return names[-1] if names else None


def gradcam(model: nn.Module, x: torch.Tensor, layer: str, class_idx: int = 1) -> torch.Tensor:
    """(B, *spatial) Grad-CAM of `class_idx` at `layer`, upsampled to the input's spatial size."""
    from monai.visualize import GradCAM

    model.eval()
    # MONAI's default post-processing maps (min, max) to (1, 0), flipping the map: keep it raw.
    cam = GradCAM(nn_module=model, target_layers=layer, postprocessing=lambda t: t)
    with torch.enable_grad():
        out = cam(x.clone().requires_grad_(True), class_idx=class_idx)
    return out[:, 0].detach().clamp_min(0)


def fracture_log_odds(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """log P(fractured) / P(not fractured) from class logits (class 0 = no fracture; grades 1-3 pooled)."""
    logits = logits.float()
    return torch.logsumexp(logits.narrow(dim, 1, logits.shape[dim] - 1), dim=dim) - logits.select(dim, 0)


def centred_cubes(spatial: Sequence[int], per_axis: int = 3) -> tuple[int, ...]:
    """Occlusion cube edges that tile each axis `per_axis` times (odd), so that one cube is centred on
    the crop's centre vertebra: with an even count the crop centre sits on the corners of 8 cubes, and
    the body is never hidden by one occlusion."""
    if per_axis % 2 == 0:
        raise ValueError(f"occlusion cubes per axis must be odd, got {per_axis}")
    return tuple(-(-int(s) // per_axis) for s in spatial)


def occlusion(model: nn.Module, x: torch.Tensor, mask_size: int | Sequence[int], n_batch: int = 16) -> torch.Tensor:
    """(B, *spatial) occlusion sensitivity: how much the fracture log-odds fall when each cube of
    `mask_size` voxels (one edge, or one per spatial axis, frames included) is replaced by its own mean
    (MONAI's "mean_patch"): the structure in the cube is gone, its intensity level stays. Darkening a
    cube instead (MONAI's Gaussian mode) puts a black hole into a vertebral body, which reads as a
    deformity: hiding the body then raised the fracture odds of true positives. Log-odds, not
    probabilities: a confident model's probability saturates and would show no change at all."""
    from monai.visualize import OcclusionSensitivity

    model.eval()
    spatial = x.shape[2:]
    edges = [mask_size] * len(spatial) if isinstance(mask_size, int) else list(mask_size)
    size = [min(m, s) for m, s in zip(edges, spatial)]
    occ = OcclusionSensitivity(nn_module=model, mask_size=size, n_batch=n_batch, verbose=False, mode="mean_patch",
                               overlap=0.0, activate=False)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using a non-tuple sequence", category=UserWarning)
        base = fracture_log_odds(model(x))
        occluded, _ = occ(x)
    drop = base.view(-1, *[1] * len(spatial)) - fracture_log_odds(occluded)
    return drop.clamp_min(0)


def attention_rollout(attentions: list[torch.Tensor]) -> torch.Tensor:
    """(B, N, N) rollout of per-block attention (B, heads, N, N): heads averaged, the residual
    path added as 0.5 A + 0.5 I, rows renormalised, multiplied from the first block to the last."""
    rollout = None
    for attn in attentions:
        a = attn.float().mean(dim=1)
        a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    assert rollout is not None, "no attention blocks"
    return rollout


def token_relevance(attention: torch.Tensor, prefix: int, pooling: str) -> torch.Tensor:
    """(B, N - prefix) relevance of each patch token for the pooled output: the cls token's row
    (pooling "cls"), or the mean of the patch tokens' rows (pooling "mean")."""
    rows = attention[:, :1] if pooling == "cls" else attention[:, prefix:]
    return rows.mean(dim=1)[:, prefix:]


def attention_maps(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The attention probabilities (B, heads, N, N) of every block, first to last, through the
    libraries' hooks: timm `Attention` (fused kernel switched off for the pass) or MONAI `SABlock`."""
    from monai.networks.blocks.selfattention import SABlock
    from timm.models.vision_transformer import Attention
    from timm.utils import AttentionExtract

    timm_blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, Attention)]
    monai_blocks = [m for m in model.modules() if isinstance(m, SABlock)]
    model.eval()
    if timm_blocks:
        fused = [m.fused_attn for _, m in timm_blocks]
        try:
            for _, m in timm_blocks:
                m.fused_attn = False
            extract = AttentionExtract(model, names=[f"{n}.attn_drop" for n, _ in timm_blocks], method="hook")
            with torch.no_grad():
                found = extract(x)
        finally:
            for (_, m), was in zip(timm_blocks, fused):
                m.fused_attn = was
        return [found[f"{n}.attn_drop"] for n, _ in timm_blocks]
    if monai_blocks:
        saved = [(m.save_attn, m.use_flash_attention) for m in monai_blocks]
        try:
            for m in monai_blocks:
                m.save_attn, m.use_flash_attention = True, False
            with torch.no_grad():
                model(x)
            return [m.att_mat for m in monai_blocks]
        finally:
            for m, (save, flash) in zip(monai_blocks, saved):
                m.save_attn, m.use_flash_attention = save, flash
    raise ValueError("the model has no timm or MONAI attention blocks")


def tokens_to_input(relevance: torch.Tensor, grid: tuple[int, ...], spatial: tuple[int, ...]) -> torch.Tensor:
    """(B, prod(grid)) token relevance -> (B, *spatial) voxels of the model input (tubelets and
    patches spread over the voxels they embed)."""
    volume = relevance.reshape(len(relevance), 1, *grid).float()
    return F.interpolate(volume, size=spatial, mode="nearest")[:, 0]


def to_crop(method: Any, cfg: Any, input_map: np.ndarray, crop_shape: tuple[int, int, int]) -> np.ndarray:
    """A map in the frame of one model input (the centre view for slice methods) -> the crop's frame.

    Volume methods see the crop resized to `crop_size`; slice methods see `views.frames` slices
    along `views.axis` (padded to the frame size): every crop slice takes its nearest frame's map."""
    if method.input_format == "slices":
        size = cfg.crop_size
        t, h, w = input_map.shape[-3:]
        top, left = (h - size) // 2, (w - size) // 2
        frames = input_map[..., top:top + size, left:left + size].reshape(t, size, size)
        positions = views.slice_positions(size, cfg.views.frames)
        nearest = np.abs(np.arange(size)[:, None] - positions[None, :]).argmin(axis=1)
        stack = frames[nearest]  # (depth along the view axis, H, W)
        volume = np.moveaxis(stack, 0, views.AXES[cfg.views.axis])
    else:
        volume = input_map.reshape(input_map.shape[-3:])
    if volume.shape != tuple(crop_shape):
        t = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
        volume = F.interpolate(t, size=tuple(crop_shape), mode="trilinear", align_corners=False)[0, 0].numpy()
    return np.asarray(volume, dtype=np.float32)
