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

Pretext (`public_to_vertebrae`, and the embedded `public` stand-in on the body-CT corpus): VoCo's
volume contrast, as in its published `models/voco_head.py` (Luffy03/VoCo, commit ba7b7bd). A volume
is cut into `model.voco_grid`^2 base crops over the axial plane (full height; VoCo: 4 x 4), and
`model.voco_random_crops` crops of a base crop's size are taken at random places; a random crop's
label is its overlap with each base crop (summing to 1). Student and EMA teacher (momentum 0.9)
embed every crop (the Swin stages' pooled outputs through a three-layer projection head); the
predicted overlap is the ReLU of the cosine similarity between a random crop and each base crop,
averaged over (student random, teacher bases) and (teacher random, student bases); the losses are
VoCo's: -label * log(1 - |label - prediction|) on overlapping bases, prediction^2 on the others,
and the squared positive similarity between different base crops. Departures, for the CPU: crops
are resized to the input's size, the multi-scale features are the
Swin stages' own outputs rather than extra UNETR blocks, the grid is 2 x 2 at the CPU presets.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.nets.swin_unetr import SwinTransformer
from torch import nn

from bench.config import pretext_crop_size
from bench.errors import BenchError
from bench.methods.pretext import MomentumTeacher
from bench.methods.swin_unetr import SwinClassifier, SwinParams, SwinUNETR, make_swin
from bench.registry import register_method
from bench.weights import WeightsSpec

ENCODER_PREFIXES = ("swinViT.", "swin_vit.")
WRAPPERS = ("module.", "backbone.")  # DDP, and the training model's `backbone` (voco_train.py)


def convert_voco(state: dict[str, torch.Tensor], target: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder tensors of a VoCo checkpoint, named as MONAI's SwinTransformer names them. The
    layouts VoCo's code writes: voco_train.py's periodic checkpoint (`state_dict` ->
    `module.backbone.swinViT.*`), its final model (flat `backbone.swinViT.*`), and the released
    files (`swinViT.*` or `swin_vit.*`, with or without `module.`); the published downstream loader
    (Finetune/BTCV/main.py) strips `module.` and `backbone.` and renames `swin_vit` the same way.
    Decoder and SSL-head keys are left out."""
    out = {}
    for key, value in state.items():
        while key.startswith(WRAPPERS):
            key = key.split(".", 1)[1]
        prefix = next((p for p in ENCODER_PREFIXES if key.startswith(p)), None)
        if prefix is not None:
            out[key[len(prefix):]] = value
    return out


VOCO_WEIGHTS = WeightsSpec(
    filename="VoCo_B_SSL_head.pt",
    url="",
    sha256="",
    hf_repo="Luffy503/VoCo", hf_file="VoCo_B_SSL_head.pt", licence="Apache-2.0 (Hugging Face model card)",
    trained_on="VoCo-B: about 1.6k public CT scans (VoCo's pretraining set)",
    layout="{['state_dict':] {'[module.][backbone.]swinViT|swin_vit.patch_embed.*', '...layers{1-4}.0.blocks.{0,1}.*', "
           "'...layers{1-4}c.0.*' (v2 residual blocks), 'encoder*/decoder*/out.*' (dropped)}}",
    convert=convert_voco,
)


@dataclass
class VoCoParams(SwinParams):
    voco_grid: int = 4  # base crops per side of the axial plane
    voco_random_crops: int = 4  # random crops per volume
    voco_momentum: float = 0.9  # the teacher's EMA momentum
    voco_head_dim: int = 2048  # width of the projection head's layers and output


def overlap_labels(offsets: torch.Tensor, edge: int, grid: int) -> torch.Tensor:
    """(N, 2) corners (x, y) of random crops of `edge` voxels -> (N, grid * grid) shares of each
    crop's area lying on each base crop (row-major over x then y); rows sum to 1."""
    starts = torch.arange(grid, device=offsets.device) * edge
    lo = torch.maximum(offsets[:, :, None], starts[None, None])
    hi = torch.minimum(offsets[:, :, None] + edge, starts[None, None] + edge)
    share = (hi - lo).clamp_min(0).float() / edge  # (N, 2 axes, grid)
    return (share[:, 0, :, None] * share[:, 1, None, :]).flatten(1)


def _projection_head(dim: int, width: int) -> nn.Sequential:
    """VoCo's projection head: two Linear + BatchNorm (no affine, batch statistics) + ReLU, a Linear."""
    def bn() -> nn.BatchNorm1d:
        return nn.BatchNorm1d(width, affine=False, track_running_stats=False)

    return nn.Sequential(nn.Linear(dim, width), bn(), nn.ReLU(inplace=True),
                         nn.Linear(width, width), bn(), nn.ReLU(inplace=True), nn.Linear(width, width))


class VolumeContrast(MomentumTeacher):
    momentum_schedule = "constant"  # VoCo's EMA keeps one momentum throughout

    def __init__(self, swin: SwinTransformer, feature_size: int, p: VoCoParams) -> None:
        super().__init__()
        self.encoder = swin
        self.head = _projection_head(31 * feature_size, p.voco_head_dim)  # stages 0-4: (1+2+4+8+16) x feature size
        self.teacher = nn.ModuleDict({"encoder": copy.deepcopy(swin), "head": copy.deepcopy(self.head)})
        self.teacher.requires_grad_(False)
        self.grid, self.n_random, self.base_momentum = p.voco_grid, p.voco_random_crops, p.voco_momentum

    @staticmethod
    def _embed(swin: nn.Module, head: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return head(torch.cat([h.mean(dim=(2, 3, 4)) for h in swin(x)], dim=1).float())

    def teacher_pairs(self) -> tuple[tuple[nn.Module, nn.Module], ...]:
        return (self.encoder, self.teacher["encoder"]), (self.head, self.teacher["head"])

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        b, size, g, r = x.shape[0], x.shape[-1], self.grid, self.n_random
        edge = size // g
        bases = [x[:, :, i * edge:(i + 1) * edge, j * edge:(j + 1) * edge, :] for i in range(g) for j in range(g)]
        offsets = torch.randint(0, size - edge + 1, (b * r, 2), device=x.device)
        randoms = [x[n // r, :, ox:ox + edge, oy:oy + edge, :] for n, (ox, oy) in enumerate(offsets.tolist())]
        labels = overlap_labels(offsets, edge, g).view(b, r, g * g)
        crops = torch.cat([torch.stack(bases, 1).flatten(0, 1), torch.stack(randoms)])  # (B*K + B*R, 1, e, e, S)
        crops = F.interpolate(crops.float(), size=x.shape[2:], mode="trilinear", align_corners=False).to(x.dtype)
        student = self._embed(self.encoder, self.head, crops)
        with torch.no_grad():
            teacher = self._embed(self.teacher["encoder"], self.teacher["head"], crops)
        k = g * g
        base_s, rand_s = student[:b * k].view(b, k, -1), student[b * k:].view(b, r, -1)
        base_t, rand_t = teacher[:b * k].view(b, k, -1), teacher[b * k:].view(b, r, -1)

        def assign(feats: torch.Tensor, bases_: torch.Tensor) -> torch.Tensor:
            return F.relu(F.cosine_similarity(feats[:, :, None], bases_[:, None], dim=-1))  # (B, R, K)

        logits = 0.5 * (assign(rand_s, base_t) + assign(rand_t, base_s))
        overlapping = labels > 0
        pos = -(labels * torch.log(1 - (labels - logits).abs() + 1e-6)).sum() / labels.sum()
        neg = (logits[~overlapping] ** 2).sum() / (~overlapping).sum().clamp_min(1)
        pairs = torch.triu(torch.ones(k, k, dtype=torch.bool, device=x.device), diagonal=1)
        between = F.relu(F.cosine_similarity(base_s[:, :, None], base_s.detach()[:, None], dim=-1))[:, pairs]
        regularisation = (between**2).mean()
        return {"loss": pos + neg + regularisation, "overlap": pos, "disjoint": neg, "bases": regularisation}


@register_method("voco")
class VoCo(SwinClassifier):
    description = "VoCo volume-contrast Swin UNETR v2 encoder (Wu et al., CVPR 2024; public checkpoints B/L/H)"
    regimes = ("scratch", "public", "public_to_vertebrae")
    Params = VoCoParams  # feature size 48 (VoCo-B), 96 (L), 192 (H); window 7, depths 2-2-2-2, heads 3-6-12-24
    public_weights = VOCO_WEIGHTS
    # the CPU presets' sizes and recipe are swin_unetr's, with a 2 x 2 grid and a narrower head
    presets = {name: {**preset, "model": {**preset["model"], "voco_grid": 2, "voco_random_crops": 2,
                                          "voco_head_dim": 256}}
               for name, preset in SwinUNETR.presets.items()}
    use_v2 = True

    def build_pretext(self, stage: str = "vertebrae") -> nn.Module:
        p, edge = self.params, pretext_crop_size(self.cfg)
        self.check_edge(edge, "pretrain.crop_size")
        if p.voco_grid < 2 or edge % p.voco_grid or p.voco_random_crops < 1:
            raise BenchError(f"{self.name}: model.voco_grid={p.voco_grid} must be >= 2 and divide the pretext's crop "
                             f"({edge}), and model.voco_random_crops={p.voco_random_crops} be >= 1")
        return VolumeContrast(make_swin(p, use_v2=True), p.feature_size, p)
