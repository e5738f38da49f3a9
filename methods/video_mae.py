"""Video MAE (naive transfer) and Video-CT MAE (Büss et al., MIDL 2024): `video_mae`, `video_ct_mae`.

A video ViT whose parameters follow the public mae_st Kinetics checkpoints key for key
(`model_state`; tubelet patch embedding 2x16x16; `cls_token`; separate `pos_embed_spatial`,
`pos_embed_temporal`, `pos_embed_class`; blocks; `norm`; decoder `decoder_embed`, `mask_token`,
`decoder_pos_embed` with a cls slot, `pred_head.transforms.0.{0..d-1}` blocks,
`pred_head.transforms.0.d` norm, `pred_head.projections.0`). The blocks are timm's (fused
attention): the public separate q/k/v are concatenated into qkv on load.

MAE: per-sample random masking, the encoder processes only the visible tokens, the decoder
predicts 1 of the 2 frames of each tubelet (8 of 16 target frames, `linspace(0, T-1, 8)`), loss on
masked patches only, optionally per-patch normalised targets. Inputs in [0, 1] are normalised with
the Kinetics statistics (mean 0.45, std 0.225) inside the model.

Video-CT adaptations, each a switch so that every row of the paper's Table 2 is one config:
- `pe_cropping`: spatial position embeddings (encoder and decoder) of the video grid (14x14 at 224)
  cropped to the centre of the vertebra grid (6x6 at 96); temporal and class embeddings reused.
  Off: the mismatched embeddings start from random values.
- `format_adaptation`: frames at the crop size; off: slices zero-padded to the video frame size.
- `multi_view`: evaluation averages the logits of every slice shift; off: the centre view only.
- `video_pretraining`, `vertebra_pretraining`: which pretraining stages `public_to_vertebrae` runs.
Finetuning head: mean of the patch tokens (cls excluded) -> encoder norm -> dropout 0.5 -> linear.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from bench.datasets.pretext import corpus_frame_size
from bench.errors import BenchError
from bench.methods.base import Method
from bench.methods.mae3d import masked_patch_loss, random_masking, unshuffle
from bench.methods.pretext import MaskedReconstruction
from bench.methods.recipes import TRANSFORMER_FINETUNE
from bench.methods.vit import VIT_LAYER_GROUPS, init_linear, take
from bench.registry import register_method
from bench.weights import WeightsSpec, fuse_qkv

KINETICS_MEAN, KINETICS_STD = 0.45, 0.225


class VideoViT(nn.Module):
    """The encoder, in the mae_st key layout; `forward` gives pooled, normalised features."""

    def __init__(self, frames: int, img_size: int, patch: int, embed_dim: int, depth: int, heads: int,
                 mlp_ratio: float = 4.0, t_patch: int = 2) -> None:
        super().__init__()
        if img_size % patch or frames % t_patch:
            raise BenchError(f"video ViT: frame size {img_size} must be a multiple of {patch}, frames {frames} of "
                             f"{t_patch}")
        self.grid = (frames // t_patch, img_size // patch, img_size // patch)
        self.patch, self.t_patch, self.embed_dim, self.frames = patch, t_patch, embed_dim, frames
        self.num_patches = self.grid[0] * self.grid[1] * self.grid[2]
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv3d(3, embed_dim, kernel_size=(t_patch, patch, patch), stride=(t_patch, patch,
                                                                                                     patch))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed_spatial = nn.Parameter(torch.zeros(1, self.grid[1] * self.grid[2], embed_dim))
        self.pos_embed_temporal = nn.Parameter(torch.zeros(1, self.grid[0], embed_dim))
        self.pos_embed_class = nn.Parameter(torch.zeros(1, 1, embed_dim))
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList(Block(embed_dim, heads, mlp_ratio, qkv_bias=True,
                                          norm_layer=norm) for _ in range(depth))
        self.norm = norm(embed_dim)
        for p in (self.cls_token, self.pos_embed_spatial, self.pos_embed_temporal, self.pos_embed_class):
            trunc_normal_(p, std=0.02)
        self.blocks.apply(init_linear)

    def pos_embed(self) -> torch.Tensor:
        t, hw = self.grid[0], self.grid[1] * self.grid[2]
        return self.pos_embed_spatial.repeat(1, t, 1) + torch.repeat_interleave(self.pos_embed_temporal, hw, dim=1)

    def forward_blocks(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 1 + n, C) tokens after the blocks (not normalised); `keep` selects visible patches."""
        x = (x - KINETICS_MEAN) / KINETICS_STD
        tokens = self.patch_embed.proj(x).flatten(2).transpose(1, 2) + self.pos_embed()  # time-major order
        if keep is not None:
            tokens = take(tokens, keep)
        cls = (self.cls_token + self.pos_embed_class).expand(len(tokens), -1, -1)
        tokens = torch.cat([cls, tokens], dim=1)
        for block in self.blocks:
            tokens = block(tokens)
        return tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.forward_blocks(x)[:, 1:].mean(dim=1))


ENCODER_KEYS = ("patch_embed.", "cls_token", "pos_embed_spatial", "pos_embed_temporal", "pos_embed_class", "blocks.",
                "norm.")  # the video ViT's own keys


class VideoMAE(VideoViT, MaskedReconstruction):
    """Encoder keys plus the mae_st decoder keys; `forward` returns the masked-patch loss."""

    def __init__(self, frames: int, img_size: int, patch: int, embed_dim: int, depth: int, heads: int,
                 decoder_dim: int, decoder_depth: int, decoder_heads: int, mask_ratio: float,
                 norm_pix_loss: bool) -> None:
        super().__init__(frames, img_size, patch, embed_dim, depth, heads)
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, decoder_dim))
        self.pred_head = nn.Module()
        self.pred_head.transforms = nn.ModuleList([nn.Sequential(
            *[Block(decoder_dim, decoder_heads, 4.0, qkv_bias=True, norm_layer=norm) for _ in range(decoder_depth)],
            norm(decoder_dim))])
        self.pred_head.projections = nn.ModuleList([nn.Linear(decoder_dim, patch * patch * 3)])  # 1 frame per tubelet
        trunc_normal_(self.mask_token, std=0.02)
        trunc_normal_(self.decoder_pos_embed, std=0.02)
        for m in (self.decoder_embed, self.pred_head):
            m.apply(init_linear)

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """Patches of the 8 (= T / t_patch) target frames, mae_st's "nctuhpwq->nthwupqc" order."""
        b, _, t, h, w = x.shape
        idx = torch.linspace(0, t - 1, t // self.t_patch).round().long().to(x.device)
        frames = (x.index_select(2, idx) - KINETICS_MEAN) / KINETICS_STD
        p, gt, gh, gw = self.patch, self.grid[0], self.grid[1], self.grid[2]
        frames = frames.reshape(b, 3, gt, 1, gh, p, gw, p)
        return torch.einsum("nctuhpwq->nthwupqc", frames).reshape(b, gt * gh * gw, p * p * 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        masking = random_masking(x.shape[0], self.num_patches, self.mask_ratio, x.device)
        latent = self.norm(self.forward_blocks(x, masking.keep))
        tokens = unshuffle(self.decoder_embed(latent), self.mask_token, masking.restore) + self.decoder_pos_embed
        hidden = take(self.pred_head.transforms[0](tokens)[:, 1:], masking.hidden)
        pred = self.pred_head.projections[0](hidden)  # the hidden patches alone are predicted
        return {"loss": masked_patch_loss(pred, take(self.target(x), masking.hidden), self.norm_pix_loss)}

    def pretrained_encoder(self) -> nn.Module:
        return self  # public weights fill encoder and decoder, as mae_st ships both

    def encoder_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if k.startswith(ENCODER_KEYS)}

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked clip, reconstruction), both shaped like `x` (B, 3, T, H, W) in its pixel scale: the
        target frames (one per tubelet, each shown for the tubelet's frames) with the hidden patches
        blanked, and with the decoder's prediction there. Normalised-pixel predictions are mapped back
        with each target patch's own mean and variance, as MAE's visualisation does."""
        masking = random_masking(x.shape[0], self.num_patches, self.mask_ratio, x.device)
        latent = self.norm(self.forward_blocks(x, masking.keep))
        tokens = unshuffle(self.decoder_embed(latent), self.mask_token, masking.restore) + self.decoder_pos_embed
        target = self.target(x).float()
        pred = take(self.pred_head.projections[0](self.pred_head.transforms[0](tokens)[:, 1:]), masking.hidden).float()
        if self.norm_pix_loss:
            var, mean = torch.var_mean(take(target, masking.hidden), dim=-1, keepdim=True)
            pred = pred * (var + 1e-6).sqrt() + mean
        b, n, size = target.shape
        rows = (masking.hidden + torch.arange(b, device=x.device).unsqueeze(1) * n).reshape(-1)
        full = target.reshape(b * n, size).index_copy(0, rows, pred.reshape(-1, size)).view(b, n, size)
        hidden = torch.zeros(b * n, size, device=x.device).index_fill(0, rows, 1.0).view(b, n, size)
        return self.clip_of(target * (1 - hidden) * KINETICS_STD + KINETICS_MEAN * (1 - hidden)), \
            self.clip_of(full * KINETICS_STD + KINETICS_MEAN)

    def clip_of(self, patches: torch.Tensor) -> torch.Tensor:
        """Target-frame patches (B, N, p*p*3) -> (B, 3, T, H, W), each target frame repeated over its tubelet."""
        p, (gt, gh, gw) = self.patch, self.grid
        frames = torch.einsum("nthwupqc->nctuhpwq", patches.reshape(len(patches), gt, gh, gw, 1, p, p, 3))
        return frames.reshape(len(patches), 3, gt, gh * p, gw * p).repeat_interleave(self.t_patch, dim=2)


def _centre_crop_grid(grid: torch.Tensor, src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """(..., Hs*Ws, C) -> (..., Hd*Wd, C): the centre Hd x Wd of an Hs x Ws token grid."""
    if dst[0] > src[0] or dst[1] > src[1]:
        raise BenchError(f"cannot crop a {src[0]}x{src[1]} position grid to {dst[0]}x{dst[1]}")
    lead, c = grid.shape[:-2], grid.shape[-1]
    g = grid.reshape(*lead, src[0], src[1], c)
    top, left = (src[0] - dst[0]) // 2, (src[1] - dst[1]) // 2
    return g[..., top:top + dst[0], left:left + dst[1], :].reshape(*lead, dst[0] * dst[1], c)


def crop_position_embeddings(state: dict[str, torch.Tensor], target: VideoViT, crop: bool) -> dict[str, torch.Tensor]:
    """Fit the spatial position embeddings (encoder, decoder) of `state` to `target`'s grid: the
    centre crop when `crop`, else dropped (random init) when the grids differ."""
    out = dict(state)
    t, h, w = target.grid
    if "pos_embed_spatial" in out:
        n = out["pos_embed_spatial"].shape[1]
        side = round(n**0.5)
        if side * side == n and (side, side) != (h, w):
            if crop:
                out["pos_embed_spatial"] = _centre_crop_grid(out["pos_embed_spatial"], (side, side), (h, w))
            else:
                del out["pos_embed_spatial"]
    if "decoder_pos_embed" in out and isinstance(target, VideoMAE):
        dec = out["decoder_pos_embed"]
        n = dec.shape[1] - 1
        side = round((n / t) ** 0.5)
        if t * side * side == n and (side, side) != (h, w):
            if crop:
                grid = dec[:, 1:].reshape(1, t, side * side, dec.shape[-1])
                grid = _centre_crop_grid(grid, (side, side), (h, w)).reshape(1, t * h * w, dec.shape[-1])
                out["decoder_pos_embed"] = torch.cat([dec[:, :1], grid], dim=1)
            else:
                del out["decoder_pos_embed"]
    return out


def convert_mae_st(state: dict[str, torch.Tensor], target: nn.Module) -> dict[str, torch.Tensor]:
    """mae_st layout (`model_state`, separate q/k/v) -> timm blocks (fused qkv); keys of `target` only.
    Position-embedding cropping follows in the method's `transfer`."""
    fused = fuse_qkv(state)
    own = target.state_dict()
    return {k: v for k, v in fused.items() if k in own}


MAE_ST_WEIGHTS = WeightsSpec(
    filename="mae_pretrain_vit_large_k700.pth",
    url="https://dl.fbaipublicfiles.com/video-mae-100x4-joint.pth",
    sha256="",
    layout="{'model_state': {patch_embed.proj [1024,3,2,16,16], cls_token, pos_embed_spatial [1,196,1024], "
           "pos_embed_temporal [1,8,1024], pos_embed_class, blocks.i.attn.{q,k,v,proj}, ..., norm, decoder_embed, "
           "mask_token, decoder_pos_embed [1,1569,512], pred_head.transforms.0.{0..3,4}, pred_head.projections.0}}",
    convert=convert_mae_st,
    licence="CC BY-NC 4.0 (facebookresearch/mae_st)", trained_on="Kinetics-700 (videos)",
)


@dataclass
class VideoMAEParams:
    patch_size: int = 16
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    decoder_dim: int = 512
    decoder_depth: int = 4
    decoder_heads: int = 16
    mask_ratio: float = 0.8  # vertebra pretraining
    video_mask_ratio: float = 0.9  # video pretraining (the public weights used 0.9)
    norm_pix_loss: bool = True
    dropout: float = 0.5
    # the Table 2 switches
    video_pretraining: bool = True
    vertebra_pretraining: bool = True
    pe_cropping: bool = True
    format_adaptation: bool = True
    multi_view: bool = True


VIDEO_PRESETS = {
    "tiny": {"lr": 1.0e-3, "model": {"embed_dim": 48, "depth": 2, "num_heads": 2, "decoder_dim": 32,
                                     "decoder_depth": 1, "decoder_heads": 2}},
    "small": {**TRANSFORMER_FINETUNE, "model": {"embed_dim": 192, "depth": 6, "num_heads": 3, "decoder_dim": 128,
                                                "decoder_depth": 2, "decoder_heads": 4}},
    # the paper's finetuning: 50 epochs, batch 64, Adam lr 1e-5, cosine with 5 warmup epochs, AMP
    "paper": {"optimizer": "adam", "lr": 1.0e-5, "weight_decay": 0.0, "batch_size": 64, "epochs": 50,
              "warmup_epochs": 5.0, "amp": True},
}


class _VideoMethod(Method):
    architecture = "transformer"
    input_format = "slices"
    regimes = ("scratch", "public", "public_to_vertebrae")
    Params = VideoMAEParams
    public_weights = MAE_ST_WEIGHTS

    def frame_size(self) -> int:
        """Frames at the crop size (format adaptation) or padded to the video frame size."""
        if self.params.format_adaptation:
            return self.cfg.crop_size
        video_size = corpus_frame_size(self.cfg)
        if video_size < self.cfg.crop_size:
            raise BenchError(f"format_adaptation=false pads {self.cfg.crop_size}-voxel slices to the video frame "
                             f"size, but synthetic.video_size is {video_size}")
        return video_size

    def view_options(self) -> dict:
        return {"frame_size": self.frame_size(), "multi_view": self.params.multi_view}

    def _vit(self, size: int) -> VideoViT:
        p = self.params
        return VideoViT(self.cfg.views.frames, size, p.patch_size, p.embed_dim, p.depth, p.num_heads)

    def build_encoder(self) -> tuple[nn.Module, int]:
        return self._vit(self.frame_size()), self.params.embed_dim

    def build_head(self, in_features: int, num_classes: int) -> nn.Module:
        return nn.Sequential(nn.Dropout(self.params.dropout), nn.Linear(in_features, num_classes))

    def layer_groups(self) -> dict:
        return VIT_LAYER_GROUPS

    def token_layout(self) -> tuple[int, tuple[int, ...], str]:
        size, patch = self.frame_size(), self.params.patch_size  # VideoViT's grid of 2-frame tubelets
        return 1, (self.cfg.views.frames // 2, size // patch, size // patch), "mean"

    def pretext_data_kind(self, stage: str) -> str:
        return "video" if stage == "public" else "slices"

    def build_pretext(self, stage: str = "vertebrae") -> nn.Module:
        p = self.params
        size = corpus_frame_size(self.cfg) if stage == "public" else self.frame_size()
        ratio = p.video_mask_ratio if stage == "public" else p.mask_ratio
        return VideoMAE(self.cfg.views.frames, size, p.patch_size, p.embed_dim, p.depth, p.num_heads,
                        p.decoder_dim, p.decoder_depth, p.decoder_heads, ratio, p.norm_pix_loss)

    def transfer(self, state: dict[str, torch.Tensor], target: nn.Module) -> dict[str, torch.Tensor]:
        return crop_position_embeddings(state, target, self.params.pe_cropping)

    def optional_encoder_keys(self) -> tuple[str, ...]:
        # the ablation leaves the spatial position embeddings (encoder and decoder) random
        return () if self.params.pe_cropping else ("pos_embed_spatial", "decoder_pos_embed")

    SWITCHES = ("video_pretraining", "vertebra_pretraining", "pe_cropping", "format_adaptation", "multi_view",
                "dropout")

    def artifact_key(self, stage: str) -> dict:
        """Video pretraining is the same for both video methods and every Table 2 switch; the
        vertebra stage depends on them (frame size, position-embedding transfer)."""
        from omegaconf import OmegaConf

        model = OmegaConf.to_container(self.params, resolve=True)
        if stage == "public":
            model = {k: v for k, v in model.items() if k not in self.SWITCHES and k != "mask_ratio"}
            return {"family": "video_mae", "model": model}
        return {"family": "video_mae", "model": model, "method": self.name}

    def pretraining_plan(self, regime: str) -> list[str]:
        p = self.params
        if regime == "scratch":
            return []
        if regime == "public":
            return ["public"] if p.video_pretraining else []
        return (["public"] if p.video_pretraining else []) + (["vertebrae"] if p.vertebra_pretraining else [])


@register_method("video_ct_mae")
class VideoCTMAE(_VideoMethod):
    description = "Video-CT MAE: video MAE ViT-L adapted to vertebrae (PE cropping, 96 frames, multi-view)"
    presets = VIDEO_PRESETS


@register_method("video_mae")
class NaiveVideoMAE(_VideoMethod):
    description = "Video MAE, naive transfer: no PE cropping, slices padded to the video size, one view"

    @dataclass
    class Params(VideoMAEParams):
        pe_cropping: bool = False
        format_adaptation: bool = False
        multi_view: bool = False

    presets = VIDEO_PRESETS
