"""3D Vision Transformers with cubic patches (`vit_b`, `vit_l`), from scratch: the paper's Table 4.

The encoder is built from timm's `Block` (pre-norm, fused scaled-dot-product attention), with a
Conv3d patch embedding, a cls token and learned position embeddings; the classifier reads the
normalised cls token. `ViT3D` is also the encoder of the 3D MAE (methods/mae3d.py). Checkpoint
key mapping for the two public ViT layouts lives here too: the MAE/timm layout (`patch_embed.proj`,
`pos_embed` with a cls slot, fused `attn.qkv`, `mlp.fc1`) and MONAI's (`patch_embedding.*`,
`attn.out_proj`, `mlp.linear1`, position embeddings without a cls slot, the final norm either as
`norm.*` or, in MaskedAutoEncoderViT, as the last `blocks.N.*`).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from bench.methods.base import Method
from bench.methods.recipes import TRANSFORMER_FINETUNE
from bench.registry import register_method
from bench.weights import WeightsSpec, resize_pos_embed_3d


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, D, H, W) -> (B, N, p^3 C) in the token order of PatchEmbed3D."""
    b, c, d, h, w = x.shape
    x = x.reshape(b, c, d // p, p, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(b, (d // p) * (h // p) * (w // p), p**3 * c)


def unpatchify(patches: torch.Tensor, p: int, grid: tuple[int, int, int], channels: int = 1) -> torch.Tensor:
    """(B, N, p^3 C) -> (B, C, D, H, W): the inverse of `patchify` on a (D/p, H/p, W/p) token grid."""
    b = patches.shape[0]
    x = patches.reshape(b, *grid, p, p, p, channels)
    return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, channels, grid[0] * p, grid[1] * p, grid[2] * p)


class PatchEmbed3D(nn.Module):
    """Cubic patches -> tokens. The weights keep the Conv3d layout of the public checkpoints, but the
    embedding runs as one matrix product over `patchify`'s patches: the same numbers, faster than
    a strided Conv3d forward + backward on CPU, and an MAE encoder can then embed its visible
    patches alone."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) -> (B, N, E), token index = (d*H + h)*W + w, as the strided conv's."""
        return self.embed_patches(patchify(x, self.patch_size))

    def embed_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, k, p^3 C) patches in `patchify` order -> (B, k, E)."""
        w = self.proj.weight  # (E, C, p, p, p) -> (E, p^3 C), the voxel order of patchify
        return F.linear(patches, w.permute(0, 2, 3, 4, 1).reshape(w.shape[0], -1), self.proj.bias)


def take(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, N, C) tokens, (B, k) indices -> (B, k, C): per-sample token selection. Row copies by
    `index_select` over the flattened batch, which is cheaper than `gather` with an index expanded
    over C, forward and backward."""
    b, n, c = tokens.shape
    rows = index + torch.arange(b, device=index.device).unsqueeze(1) * n
    return tokens.reshape(b * n, c).index_select(0, rows.reshape(-1)).view(b, index.shape[1], c)


class ViT3D(nn.Module):
    """Cubic-patch 3D ViT. `forward` returns the normalised cls token; `forward_patches` can take
    only a subset of patch tokens (MAE: the encoder sees the visible tokens alone)."""

    def __init__(self, img_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int,
                 mlp_ratio: float = 4.0, in_chans: int = 1, drop_path: float = 0.0) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.grid = (img_size // patch_size,) * 3
        self.num_patches = self.grid[0] ** 3
        self.patch_size, self.embed_dim = patch_size, embed_dim
        self.patch_embed = PatchEmbed3D(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, embed_dim))
        norm = partial(nn.LayerNorm, eps=1e-6)
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm, drop_path=r) for r in rates
        )
        self.norm = norm(embed_dim)
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_linear)

    def embed(self, patches: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, p^3 C) patches -> (B, k, E) position-embedded tokens of the `keep` (B, k) patches
        (all N when None); the rest are never embedded."""
        pos = self.pos_embed[:, 1:]
        if keep is not None:
            patches, pos = take(patches, keep), take(pos.expand(len(patches), -1, -1), keep)
        return self.patch_embed.embed_patches(patches) + pos

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, k, E) embedded patch tokens -> (B, 1 + k, E) normalised tokens, cls first."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(len(tokens), -1, -1)
        tokens = torch.cat([cls, tokens], dim=1)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)

    def forward_patches(self, patches: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        return self.encode(self.embed(patches, keep))

    def forward_tokens(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 1 + k, E) normalised tokens of a volume; `keep` (B, k) indexes the patches to process."""
        return self.forward_patches(patchify(x, self.patch_size), keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(x)[:, 0]


def init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


ENCODER_PREFIXES = ("patch_embed.", "cls_token", "pos_embed", "blocks.", "norm.")


def convert_mae_layout(state: dict[str, torch.Tensor], target: ViT3D) -> dict[str, torch.Tensor]:
    """MAE / timm layout -> ViT3D: encoder keys kept, decoder keys dropped, pos_embed resized."""
    out = {k: v for k, v in state.items() if k.startswith(ENCODER_PREFIXES)}
    if "pos_embed" in out:
        out["pos_embed"] = resize_pos_embed_3d(out["pos_embed"], target.grid, prefix_tokens=1)
    return out


def convert_monai_layout(state: dict[str, torch.Tensor], target: ViT3D) -> dict[str, torch.Tensor]:
    """MONAI ViT / ViTAutoEnc / MaskedAutoEncoderViT layout -> ViT3D."""
    depth = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("blocks.") and k.split(".")[1].isdigit()),
                    default=-1)
    if f"blocks.{depth - 1}.weight" in state and f"blocks.{depth - 1}.attn.qkv.weight" not in state:
        depth -= 1  # MaskedAutoEncoderViT: blocks = Sequential(*transformer blocks, LayerNorm)
    renames = {"attn.out_proj.": "attn.proj.", "mlp.linear1.": "mlp.fc1.", "mlp.linear2.": "mlp.fc2."}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".cross_attn." in key or ".norm_cross_attn." in key:
            continue  # MONAI 1.4/1.5 cross-attention slots, unused by these models
        if key == "patch_embedding.patch_embeddings.weight":
            out["patch_embed.proj.weight"] = value
        elif key == "patch_embedding.patch_embeddings.bias":
            out["patch_embed.proj.bias"] = value
        elif key == "patch_embedding.position_embeddings":
            grid = resize_pos_embed_3d(value, target.grid, prefix_tokens=0)
            out["pos_embed"] = torch.cat([torch.zeros_like(grid[:, :1]), grid], dim=1)  # no cls slot in MONAI
        elif key == "cls_token" or key.startswith("norm."):
            out[key] = value
        elif key.startswith(f"blocks.{depth}."):
            out["norm." + key.split(".", 2)[2]] = value
        elif key.startswith("blocks."):
            for old, new in renames.items():
                key = key.replace(old, new)
            out[key] = value
    for key in [k for k in out if k.endswith(".attn.qkv.weight")]:
        bias = key.removesuffix("weight") + "bias"
        if bias not in out:  # MONAI's blocks default to qkv_bias=False: no bias is a zero bias
            out[bias] = torch.zeros(out[key].shape[0], dtype=out[key].dtype)
    return out


def convert_vit_checkpoint(state: dict[str, torch.Tensor], target: ViT3D) -> dict[str, torch.Tensor]:
    """Either public ViT layout, recognised by its patch-embedding key."""
    if any(k.startswith("patch_embedding.") for k in state):
        return convert_monai_layout(state, target)
    return convert_mae_layout(state, target)


@dataclass
class ViTParams:
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    drop_path: float = 0.1



# Layer order of ViT3D under the classifier (timm group matcher): embeddings, then each block; the
# final norm and the head form the top group.
VIT_LAYER_GROUPS = {"stem": r"^encoder\.(?:cls_token|pos_embed|patch_embed)", "blocks": r"^encoder\.blocks\.(\d+)"}

VIT_PRESETS = {
    "tiny": {"lr": 1.0e-3, "model": {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 2, "drop_path": 0.0}},
    "small": {**TRANSFORMER_FINETUNE, "model": {"patch_size": 12, "embed_dim": 192, "depth": 6, "num_heads": 3,
                                                "drop_path": 0.0}},
}


class ViTMethod(Method):
    architecture = "transformer"
    Params = ViTParams
    presets = VIT_PRESETS
    public_weights = WeightsSpec(
        filename="(a 3D ViT checkpoint)", url="", sha256="",
        layout="MAE/timm (patch_embed, pos_embed with cls, fused qkv) or MONAI (patch_embedding.*)",
        convert=convert_vit_checkpoint,
    )

    def make_vit(self) -> ViT3D:
        p = self.params
        return ViT3D(self.cfg.crop_size, p.patch_size, p.embed_dim, p.depth, p.num_heads, p.mlp_ratio,
                     drop_path=p.drop_path)

    def build_encoder(self) -> tuple[nn.Module, int]:
        vit = self.make_vit()
        return vit, vit.embed_dim

    def layer_groups(self) -> dict:
        return VIT_LAYER_GROUPS

    def token_layout(self) -> tuple[int, tuple[int, ...], str]:
        return 1, (self.cfg.crop_size // self.params.patch_size,) * 3, "cls"


@register_method("vit_b")
class ViTB(ViTMethod):
    description = "3D ViT-B, cubic 16^3 patches, cls-token head (Table 4)"
    regimes = ("scratch",)


@register_method("vit_l")
class ViTL(ViTMethod):
    description = "3D ViT-L, cubic 16^3 patches, cls-token head (Table 4)"
    regimes = ("scratch",)

    presets = {
        "tiny": {"lr": 1.0e-3, "model": {"patch_size": 8, "embed_dim": 64, "depth": 3, "num_heads": 2,
                                         "drop_path": 0.0}},
        "small": {**TRANSFORMER_FINETUNE, "model": {"patch_size": 12, "embed_dim": 256, "depth": 8, "num_heads": 4,
                                                    "drop_path": 0.0}},
    }

    @dataclass
    class Params(ViTParams):
        embed_dim: int = 1024
        depth: int = 24
        num_heads: int = 16
        drop_path: float = 0.2
