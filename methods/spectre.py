"""SPECTRE (Claessens et al., "Scaling self-supervised and cross-modal pretraining for volumetric CT
transformers", CVPR 2026; cclaess/SPECTRE): the local 3D ViT-L backbone, pretrained with DINOv2
(DINO + iBOT + KoLeo) and then aligned with radiology reports on open CT data sets: `spectre`.

Encoder, as `src/spectre/models/vision_transformer.py` builds `vit_large_patch16_128` with the
released configuration (`MODEL_CONFIGS['spectre-large-pretrained']`; verified at commit 9260676):
patches of 16 x 16 x 8 voxels (H, W, D of a RAS volume) embedded by a biased Conv3d, a cls token and
no learned position embedding: 3D axial rotary embeddings (`layers/rotary_pos_embed.py`, base 1000,
coordinates in [-1, 1] per axis, `head_dim // 6` periods kept as a buffer) rotate the patch tokens'
queries and keys; 24 pre-norm blocks of width 1080 with 12 heads, separate `q` and `kv` projections
(`layers/attention.py`, mode "mha"), timm's `Mlp` (ratio 4) and `LayerScale` on both branches
(`init_values` 1.0), LayerNorms of PyTorch's default eps, and a final norm. SPECTRE's image feature
is the cls token beside the mean of the patch tokens (`combine_features`): 2 x 1080 features.

Checkpoints: the released backbone files (`spectre_backbone_vit_large_patch16_128[_no_vla].pt`) are
the VisionTransformer's own flat state dict (`VisionTransformer.from_pretrained`); the training
checkpoint of `experiments/pretraining/pretrain_dinov2_v3.py` (`utils/checkpointing.save_state`)
keeps the whole DINOv2 model under `model`, the backbone there as `backbone_teacher.vit.*` (the
teacher, which DINO evaluates) and `backbone_student.vit.*`.

Preprocessing as SPECTRE's downstream scripts (`experiments/classification/*.py`): RAS, HU
[-1000, 1000] -> [0, 1] (the harness's own window), voxels of 0.75 x 0.75 x 1.5 mm: the depth axis
is resampled to half the in-plane resolution inside the encoder (`model.depth_scale`).

Pretext (`public` stand-in and `vertebrae`): SPECTRE's DINOv2 in miniature: an EMA teacher (momentum
from `model.teacher_momentum` to 1 on a cosine), two global views, a DINO loss on the cls token
against the other view's sharpened teacher output, and an iBOT loss on the student's masked patch
tokens against the teacher's tokens at the same places (separate heads, as `ibot_seperate_head:
true`). The teacher's outputs are normalised by DINOv2's Sinkhorn-Knopp (`model.centering`; DINO's
running centre as the alternative, which on schedules this short collapses to the uniform output,
a loss stuck at ln K). The multi-crop local views and KoLeo are left out at this scale.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale, Mlp, trunc_normal_
from torch import nn

from bench.errors import BenchError
from bench.methods.augment import TwoViews
from bench.methods.base import Method
from bench.methods.inputs import hu_window
from bench.methods.pretext import MomentumTeacher
from bench.methods.recipes import TRANSFORMER_FINETUNE
from bench.registry import register_method
from bench.weights import WeightsSpec

PREFIXES = ("backbone_teacher.vit.", "backbone_student.vit.", "module.", "")


def unwrap_spectre(checkpoint: dict) -> dict[str, torch.Tensor]:
    """A released backbone file is the state dict itself; a training checkpoint keeps it under `model`."""
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):
        return checkpoint["model"]
    return checkpoint


def convert_spectre(state: dict[str, torch.Tensor], target: nn.Module) -> dict[str, torch.Tensor]:
    """The keys under whichever published prefix holds the most of `target`'s keys (the teacher's
    before the student's when a training checkpoint holds both)."""
    own = set(target.state_dict())

    def under(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

    return max((under(p) for p in PREFIXES), key=lambda s: len(own & set(s)))


class AxialRoPE3D(nn.Module):
    """3D axial rotary embedding: each axis rotates a third of every head's channel pairs by angles
    2 pi c / period, c the token's centre in [-1, 1] along that axis."""

    def __init__(self, head_dim: int, base: float) -> None:
        super().__init__()
        if head_dim % 6:
            raise BenchError(f"SPECTRE's 3D rotary embedding needs a head width divisible by 6, got {head_dim}: "
                             f"choose model.embed_dim and model.num_heads accordingly")
        periods = base ** (2 * torch.arange(head_dim // 6, dtype=torch.float32) / (head_dim // 3))
        self.register_buffer("periods", periods, persistent=True)

    def forward(self, grid: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(sin, cos), each (H * W * D, head_dim), tokens in the patch embedding's order."""
        axes = [(torch.arange(n, dtype=torch.float32, device=self.periods.device) + 0.5) / n * 2 - 1 for n in grid]
        coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).flatten(0, 2)  # (N, 3)
        angles = (2 * math.pi * coords[:, :, None] / self.periods).flatten(1).tile(2)
        return angles.sin(), angles.cos()


def rotate(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class Attention(nn.Module):
    """Multi-head attention with separate q and kv projections; rotary embeddings on the patch tokens
    (those after the `prefix` cls token)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], prefix: int) -> torch.Tensor:
        b, n, c = x.shape
        q = self.q(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        sin, cos = rope
        q = torch.cat([q[:, :, :prefix], rotate(q[:, :, prefix:].float(), sin, cos).to(q.dtype)], dim=2)
        k = torch.cat([k[:, :, :prefix], rotate(k[:, :, prefix:].float(), sin, cos).to(k.dtype)], dim=2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, init_values: float | None, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), rope, prefix=1)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


@dataclass
class SpectreParams:
    patch_size: list[int] = field(default_factory=lambda: [16, 16, 8])
    embed_dim: int = 1080
    depth: int = 24
    num_heads: int = 12
    mlp_ratio: float = 4.0
    init_values: float = 1.0  # LayerScale; 0 builds blocks without it
    rope_base: float = 1000.0
    drop_path: float = 0.1
    hu_window: list[float] = field(default_factory=lambda: [-1000.0, 1000.0])
    depth_scale: float = 0.5  # SPECTRE's 1.5 mm slices over its 0.75 mm pixels
    # DINOv2 stand-in
    prototypes: int = 1024
    teacher_momentum: float = 0.992
    teacher_temp: float = 0.07
    student_temp: float = 0.1
    center_momentum: float = 0.9  # for centering="centering"
    centering: str = "sinkhorn_knopp"  # DINOv2's two teacher normalisations: "sinkhorn_knopp" or "centering"
    mask_ratio: float = 0.5

    def __post_init__(self) -> None:
        if self.centering not in ("sinkhorn_knopp", "centering"):
            raise BenchError(f"model.centering={self.centering!r}: expected sinkhorn_knopp or centering")


class SpectreViT(nn.Module):
    """SPECTRE's VisionTransformer: (B, 1, H, W, D) -> (B, 1 + N, E) normalised tokens, cls first."""

    def __init__(self, p: SpectreParams) -> None:
        super().__init__()
        self.patch_size = tuple(int(s) for s in p.patch_size)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv3d(1, p.embed_dim, self.patch_size, stride=self.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, p.embed_dim))
        self.rope = AxialRoPE3D(p.embed_dim // p.num_heads, p.rope_base)
        rates = torch.linspace(0, p.drop_path, p.depth).tolist()
        self.blocks = nn.Sequential(*(Block(p.embed_dim, p.num_heads, p.mlp_ratio, p.init_values or None, r)
                                      for r in rates))
        self.norm = nn.LayerNorm(p.embed_dim)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """(B, 1, H, W, D) -> (B, N, E) patch tokens and their (H, W, D) grid."""
        for n, p in zip(x.shape[2:], self.patch_size):
            if n % p:
                raise BenchError(f"SPECTRE's input of {tuple(x.shape[2:])} voxels is not a multiple of its patch "
                                 f"{self.patch_size}: choose crop_size (and model.depth_scale) accordingly")
        tokens = self.patch_embed.proj(x)
        return tokens.flatten(2).transpose(1, 2), tuple(tokens.shape[2:])

    def encode(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        x = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1)
        rope = self.rope(grid)
        for block in self.blocks:
            x = block(x, rope)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(*self.embed(x))


def cls_and_mean(tokens: torch.Tensor) -> torch.Tensor:
    """SPECTRE's image feature: the cls token beside the mean of the patch tokens."""
    return torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=-1)


class SpectreEncoder(nn.Module):
    """A RAS crop -> SPECTRE's input (window, depth at half the in-plane resolution) -> 2 E features."""

    def __init__(self, p: SpectreParams) -> None:
        super().__init__()
        self.window = hu_window(list(p.hu_window))
        self.depth_scale = float(p.depth_scale)
        self.vit = SpectreViT(p)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = self.window(x)
        if self.depth_scale != 1.0:
            depth = max(1, round(x.shape[-1] * self.depth_scale))
            x = F.interpolate(x, size=(*x.shape[2:4], depth), mode="trilinear", align_corners=False)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cls_and_mean(self.vit(self.prepare(x)))


def head(dim: int, prototypes: int) -> nn.Module:
    """DINO's projection head in miniature: MLP, L2-normalised bottleneck, prototypes."""
    return nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, 256), Normalise(),
                         nn.utils.parametrizations.weight_norm(nn.Linear(256, prototypes, bias=False)))


class Normalise(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1)


class DINOv2Pretext(MomentumTeacher):
    """DINO (cls) + iBOT (masked patches) self-distillation with an EMA teacher (DINO's cosine
    momentum schedule from `model.teacher_momentum` to 1)."""

    def __init__(self, encoder: SpectreEncoder, p: SpectreParams) -> None:
        super().__init__()
        dim = p.embed_dim
        self.encoder = encoder
        self.dino_head, self.ibot_head = head(dim, p.prototypes), head(dim, p.prototypes)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.teacher = nn.ModuleDict({"vit": copy.deepcopy(encoder.vit), "dino_head": copy.deepcopy(self.dino_head),
                                      "ibot_head": copy.deepcopy(self.ibot_head)})
        self.teacher.requires_grad_(False)
        self.register_buffer("dino_center", torch.zeros(1, p.prototypes))
        self.register_buffer("ibot_center", torch.zeros(1, p.prototypes))
        self.p, self.base_momentum = p, p.teacher_momentum
        self.views = TwoViews(min_scale=0.5)

    def teacher_pairs(self) -> tuple[tuple[nn.Module, nn.Module], ...]:
        return ((self.encoder.vit, self.teacher["vit"]), (self.dino_head, self.teacher["dino_head"]),
                (self.ibot_head, self.teacher["ibot_head"]))

    def pretrained_encoder(self) -> nn.Module:
        return self.encoder.vit

    def targets(self, logits: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
        if self.p.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(logits.float() / self.p.teacher_temp)
        return F.softmax((logits.float() - center) / self.p.teacher_temp, dim=-1)

    def distil(self, student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return -(target * F.log_softmax(student.float() / self.p.student_temp, dim=-1)).sum(-1).mean()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        views = [self.encoder.prepare(v) for v in self.views(x)]
        with torch.no_grad():
            teacher = [self.teacher["vit"](v) for v in views]
            t_cls = [self.teacher["dino_head"](t[:, 0]) for t in teacher]
            t_patch = [self.teacher["ibot_head"](t[:, 1:]) for t in teacher]
        dino = ibot = 0.0
        for i, v in enumerate(views):
            tokens, grid = self.encoder.vit.embed(v)
            masked = torch.rand(tokens.shape[:2], device=tokens.device) < self.p.mask_ratio
            tokens = torch.where(masked[..., None], self.mask_token.to(tokens.dtype), tokens)
            out = self.encoder.vit.encode(tokens, grid)
            dino = dino + self.distil(self.dino_head(out[:, 0]), self.targets(t_cls[1 - i], self.dino_center))
            s_patch = self.ibot_head(out[:, 1:][masked])
            ibot = ibot + self.distil(s_patch, self.targets(t_patch[i][masked], self.ibot_center))
        if self.training:
            with torch.no_grad():
                m = self.p.center_momentum
                self.dino_center.mul_(m).add_(torch.cat(t_cls).float().mean(0, keepdim=True), alpha=1 - m)
                patches = torch.cat([t.flatten(0, 1) for t in t_patch]).float()
                self.ibot_center.mul_(m).add_(patches.mean(0, keepdim=True), alpha=1 - m)
        dino, ibot = dino / 2, ibot / 2
        return {"loss": dino + ibot, "dino": dino.detach(), "ibot": ibot.detach()}


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, iterations: int = 3) -> torch.Tensor:
    """DINOv2's Sinkhorn-Knopp teacher: (N, K) sharpened logits -> (N, K) targets, each row a
    distribution, alternately rescaled so every prototype receives an equal share of the batch. The
    equipartition rules out the uniform collapse that plain centring allows on short schedules."""
    q = torch.exp(scores - scores.max()).t()  # (K, N); the shift cancels in the normalisations
    q /= q.sum()
    prototypes, samples = q.shape
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True) * prototypes
        q /= q.sum(dim=0, keepdim=True) * samples
    return (q * samples).t()


@register_method("spectre")
class Spectre(Method):
    description = "SPECTRE 3D ViT-L (RoPE), DINOv2 + report alignment on open CT (Claessens et al., CVPR 2026)"
    regimes = ("scratch", "public", "public_to_vertebrae")
    architecture = "transformer"
    Params = SpectreParams
    presets = {
        "tiny": {"lr": 1.0e-3, "model": {"patch_size": [8, 8, 4], "embed_dim": 48, "depth": 2, "num_heads": 2,
                                         "drop_path": 0.0, "prototypes": 64}},
        "small": {**TRANSFORMER_FINETUNE, "model": {"patch_size": [12, 12, 6], "embed_dim": 192, "depth": 6,
                                                    "num_heads": 4, "drop_path": 0.0, "prototypes": 64,
                                                    "teacher_temp": 0.04}},
    }
    public_weights = WeightsSpec(
        filename="spectre_backbone_vit_large_patch16_128.pt", url="", sha256="",
        hf_repo="cclaess/SPECTRE", hf_file="spectre_backbone_vit_large_patch16_128.pt",
        licence="CC-BY-NC-SA 4.0 (weights, LICENSE_MODELS); code MIT",
        trained_on="open CT data sets (CT-RATE, INSPECT, Merlin, NLST, AMOS, AbdomenAtlas, PANORAMA, "
                   "AbdomenCT-1K): DINOv2, then report alignment",
        layout="flat {'cls_token', 'patch_embed.proj.*', 'rope.periods', 'blocks.<i>.{norm1,attn.q,attn.kv,attn.proj,"
               "ls1.gamma,norm2,mlp.fc1,mlp.fc2,ls2.gamma}.*', 'norm.*'} or the training checkpoint "
               "{'model': {'backbone_teacher.vit.*', ...}}",
        convert=convert_spectre, unwrap=unwrap_spectre,
    )

    def build_encoder(self) -> tuple[nn.Module, int]:
        encoder = SpectreEncoder(self.params)
        return encoder, 2 * self.params.embed_dim

    def finetune_encoder(self, model: nn.Module) -> nn.Module:
        return model.encoder.vit

    def layer_groups(self) -> dict:
        return {"stem": r"^encoder\.vit\.(?:cls_token|patch_embed|rope)", "blocks": r"^encoder\.vit\.blocks\.(\d+)"}

    def build_pretext(self, stage: str = "vertebrae") -> nn.Module:
        encoder, _ = self.build_encoder()
        return DINOv2Pretext(encoder, self.params)
