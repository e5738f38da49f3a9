"""OpenMind / nnssl checkpoints (Wald et al., "An OpenMind for 3D medical vision self-supervised
learning", ICCV 2025; the SSL3D challenge): `openmind_resencl` and `openmind_primusm`.

Networks from `dynamic-network-architectures`, the package nnssl and nnU-Net build them with, so the
published key names hold: the ResEnc-L U-Net's residual encoder (6 stages, 32-64-128-256-320-320
channels, 1-3-4-6-6-6 blocks, InstanceNorm, LeakyReLU) and Primus-M (an Eva ViT: 8^3 patches,
width 864, 16 blocks, 12 heads, learned absolute position embedding plus RoPE). Finetuning pools the
encoder's last stage (ResEnc) or its tokens (Primus) globally into a linear head.

Checkpoints (`MIC-DKFZ/ResEncL-OpenMind-MAE`, `AnonRes/PrimusM-OpenMind-*`, ...): a `torch.save`
dict with `network_weights` (the whole pretraining network's state dict), `nnssl_adaptation_plan`
(plain data), `init_args`, `trainer_name`. The adaptation plan names where the encoder is:
`key_to_encoder` (`encoder.stages` for ResEnc, `eva` for Primus), `key_to_stem` (`encoder.stem` /
`down_projection`) and `key_to_lpe` (`eva.pos_embed`, interpolated to the finetuning token grid).
The loader reads these keys from the plan instead of guessing prefixes, and refuses a plan whose
`architecture_plans.arch_class_name` is of the other family. Confirmed in MIC-DKFZ/nnssl (commit
7044864): `training/nnsslTrainer/AbstractTrainer.py` (save_checkpoint), `adaptation_planning/
adaptation_plan.py` (the plan's fields), `masked_image_modeling/BaseMAETrainer.py` (ResEncL plan)
and `BaseEvaMAETrainer.py` (PrimusM plan).

Preprocessing as the checkpoints expect: 1 mm voxels (the `paper` preset's crops are 96^3 at 1 mm)
and z-score intensity per image (nnssl's ZScoreNormalization without a mask), applied inside the
encoder. Our crops are HU clipped to [-1000, 1000]; the z-score is invariant to that scaling.

Pretext (`public_to_vertebrae`, and the embedded `public` stand-in on the body-CT corpus): the
masked-image modelling the OpenMind MAE checkpoints were made with. ResEnc: 75 % of the volume's
blocks (16^3 voxels at the paper preset) set to zero, the whole U-Net reconstructs the image, MSE on
the masked voxels. Primus: 75 % of the patch tokens dropped before the Eva encoder, a learned mask
token put back in their places, an Eva decoder (nnssl's EvaMAE: the encoder's width, its own position
embeddings; 2 blocks for Primus-M, `BaseEvaMAETrainer`; layer scale 0.1 and the inner attention norm
in encoder and decoder alike) mixes them with the kept tokens, and Primus' patch decoder
reconstructs; MSE on the dropped patches. The Eva decoder is what carries the kept tokens' information
to the dropped places: the patch decoder restores each patch from its own token alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from bench.errors import BenchError
from bench.methods.base import Method
from bench.methods.pretext import MaskedReconstruction
from bench.methods.recipes import TRANSFORMER_FINETUNE
from bench.registry import register_method
from bench.weights import WeightsSpec, resize_pos_embed_3d

PLAN = "nnssl_adaptation_plan"


def zscore(x: torch.Tensor) -> torch.Tensor:
    """Each image to zero mean and unit standard deviation (nnssl's ZScoreNormalization)."""
    dims = tuple(range(1, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    std = x.std(dim=dims, keepdim=True).clamp_min(1e-8)
    return (x - mean) / std


def read_adaptation_plan(obj: Any, families: tuple[str, ...], own_names: tuple[str, str], method: str
                         ) -> dict[str, torch.Tensor]:
    """The stem and encoder tensors of an nnssl checkpoint, found through its adaptation plan and
    renamed to this module's (stem, encoder) names; the position embedding keeps its place."""
    if not isinstance(obj, dict) or not isinstance(obj.get("network_weights"), dict) or PLAN not in obj:
        found = ", ".join(map(str, list(obj)[:6])) if isinstance(obj, dict) else type(obj).__name__
        raise BenchError(f"not an nnssl checkpoint: expected a dict with 'network_weights' and '{PLAN}' "
                         f"(found: {found})")
    plan = obj[PLAN]
    try:
        arch = str(plan["architecture_plans"]["arch_class_name"])
        stem, encoder = str(plan["key_to_stem"]), str(plan["key_to_encoder"])
        channels = int(plan.get("pretrain_num_input_channels", 1))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BenchError(f"the checkpoint's {PLAN} is not readable ({type(exc).__name__}: {exc}); expected "
                         f"architecture_plans.arch_class_name, key_to_stem, key_to_encoder") from None
    if not arch.rsplit(".", 1)[-1].startswith(families):
        raise BenchError(f"the checkpoint's adaptation plan names architecture '{arch}'; '{method}' loads "
                         f"{' / '.join(families)} checkpoints")
    if channels != 1:
        raise BenchError(f"the checkpoint was pretrained on {channels} input channels; CT crops have 1")
    out = {}
    for key, value in obj["network_weights"].items():
        key = key.removeprefix("module.")
        for prefix, own in ((stem, own_names[0]), (encoder, own_names[1])):
            if isinstance(value, torch.Tensor) and key.startswith(prefix + "."):
                out[own + key[len(prefix):]] = value
    if not out:
        raise BenchError(f"no tensor of 'network_weights' lies under the plan's key_to_stem '{stem}' or "
                         f"key_to_encoder '{encoder}'")
    return out


# ---- ResEnc-L -------------------------------------------------------------------------------------

@dataclass
class ResEncParams:
    features_per_stage: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 320, 320])
    n_blocks_per_stage: list[int] = field(default_factory=lambda: [1, 3, 4, 6, 6, 6])
    mask_ratio: float = 0.75
    mask_block: int = 16  # edge of the masked blocks, voxels
    first_stride: int = 1  # ResEnc-L's; the CPU presets use 2 (as the CNNs' CPU presets do), a 4-8x cheaper step


def resenc_kwargs(p: ResEncParams) -> dict[str, Any]:
    """ResEnc-L's arguments (nnssl architecture_registry.get_res_enc_l) at the preset's widths."""
    if len(p.features_per_stage) != len(p.n_blocks_per_stage):
        raise BenchError(f"model.features_per_stage ({len(p.features_per_stage)} stages) and "
                         f"model.n_blocks_per_stage ({len(p.n_blocks_per_stage)}) must have the same length")
    n = len(p.features_per_stage)
    return {"input_channels": 1, "n_stages": n, "features_per_stage": list(p.features_per_stage),
            "conv_op": nn.Conv3d, "kernel_sizes": [[3, 3, 3]] * n,
            "strides": [[p.first_stride] * 3] + [[2, 2, 2]] * (n - 1),
            "n_blocks_per_stage": list(p.n_blocks_per_stage), "conv_bias": True, "norm_op": nn.InstanceNorm3d,
            "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "nonlin": nn.LeakyReLU,
            "nonlin_kwargs": {"inplace": True}}


class ResEncPooled(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(zscore(x)).mean(dim=(2, 3, 4))


def block_mask(shape: torch.Size, block: int, ratio: float, device: torch.device) -> torch.Tensor:
    """(B, 1, D, H, W) with 1 where the image is kept and 0 on `ratio` of its blocks (drawn exactly)."""
    b, grid = shape[0], [s // block for s in shape[2:]]
    n = grid[0] * grid[1] * grid[2]
    masked = max(1, int(round(ratio * n)))
    order = torch.rand(b, n, device=device).argsort(dim=1)
    keep = torch.ones(b, n, device=device)
    keep.scatter_(1, order[:, :masked], 0.0)
    keep = keep.view(b, 1, *grid)
    for axis in (2, 3, 4):
        keep = keep.repeat_interleave(block, dim=axis)
    return keep


class ResEncMAE(MaskedReconstruction):
    """nnssl's MAE for convolutional networks: blocks zeroed, the U-Net restores the image."""

    def __init__(self, unet: nn.Module, block: int, ratio: float) -> None:
        super().__init__()
        self.unet = unet
        self.block, self.ratio = block, ratio

    def restore(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z-scored image, kept-voxel mask, the U-Net's restoration at its output resolution)."""
        if any(s % self.block for s in x.shape[2:]):
            raise BenchError(f"crops of {tuple(x.shape[2:])} voxels are not divisible by model.mask_block={self.block}")
        image = zscore(x.float())
        keep = block_mask(image.shape, self.block, self.ratio, image.device)
        return image, keep, self.unet((image * keep).to(x.dtype)).float()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        image, keep, restored = self.restore(x)
        hidden = 1.0 - keep
        if restored.shape != image.shape:  # a strided first stage restores at its own resolution
            image, hidden = (F.interpolate(t, size=restored.shape[2:], mode="area") for t in (image, hidden))
        return {"loss": ((restored - image) ** 2 * hidden).sum() / hidden.sum()}

    def pretrained_encoder(self) -> nn.Module:
        return self.unet.encoder

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image, keep, restored = self.restore(x)
        if restored.shape != image.shape:
            restored = F.interpolate(restored, size=image.shape[2:], mode="trilinear", align_corners=False)
        return shown_in_input_scale(x, keep, restored)


def shown_in_input_scale(x: torch.Tensor, keep: torch.Tensor, restored: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked input, reconstruction) for `bench explain`, in the input's intensities: the hidden
    voxels blanked, and the visible voxels kept with the z-scored restoration mapped back by the
    input's own mean and standard deviation at the hidden ones (as MAE's visualisation does)."""
    x = x.float()
    dims = tuple(range(1, x.dim()))
    mean, std = x.mean(dim=dims, keepdim=True), x.std(dim=dims, keepdim=True).clamp_min(1e-8)
    return x * keep, x * keep + (restored * std + mean) * (1.0 - keep)


@register_method("openmind_resencl")
class OpenMindResEncL(Method):
    description = "OpenMind / nnssl ResEnc-L U-Net encoder, MAE pretraining (Wald et al., ICCV 2025)"
    regimes = ("scratch", "public", "public_to_vertebrae")
    Params = ResEncParams
    channels_last = True
    presets = {
        "tiny": {"model": {"features_per_stage": [4, 8, 16], "n_blocks_per_stage": [1, 1, 1], "first_stride": 2,
                           "mask_block": 8}},
        # LP-FT (Kumar et al., ICLR 2022: the head starts as the linear probe, so finetuning does not distort the
        # pretrained features through a random head); without it, a random head on the MAE stand-in's init did
        # not learn (docs/configuration.md, "Why the per-method presets")
        "small": {"amp": True, "head_init": "linear_probe",
                  "model": {"features_per_stage": [8, 16, 32, 64], "n_blocks_per_stage": [1, 2, 2, 2],
                            "first_stride": 2, "mask_block": 8}},
    }
    public_weights = WeightsSpec(
        filename="ResEncL-OpenMind-MAE (checkpoint_final.pth)", url="", sha256="",
        hf_repo="MIC-DKFZ/ResEncL-OpenMind-MAE", hf_file="checkpoint_final.pth",
        licence="CC-BY-4.0 (Hugging Face model card)",
        trained_on="OpenMind: 114k public 3D brain MRI volumes, 23 MRI modalities (nnssl MAE); no CT",
        layout="{'network_weights': {'encoder.stem.*', 'encoder.stages.{0-5}.*', 'decoder.*'}, "
               "'nnssl_adaptation_plan': {'architecture_plans': {'arch_class_name': 'ResEncL'}, "
               "'key_to_encoder': 'encoder.stages', 'key_to_stem': 'encoder.stem', ...}, 'init_args', 'trainer_name'}",
        convert=lambda state, target: state,
        unwrap=lambda obj: read_adaptation_plan(obj, ("ResEnc", "NoSkipResEnc", "ResidualEncoderUNet"),
                                                ("stem", "stages"), "openmind_resencl"),
    )

    def build_encoder(self) -> tuple[nn.Module, int]:
        from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder

        kwargs = resenc_kwargs(self.params)
        factor = self.params.first_stride * 2 ** (kwargs["n_stages"] - 1)
        if self.cfg.crop_size % factor or self.cfg.crop_size < 2 * factor:
            raise BenchError(f"{self.name}: crop_size {self.cfg.crop_size} must be a multiple of {factor} and leave at "
                             f"least 2 voxels after downsampling by {factor} (model.features_per_stage has "
                             f"{kwargs['n_stages']} stages, model.first_stride={self.params.first_stride})")
        return ResEncPooled(ResidualEncoder(**kwargs)), self.params.features_per_stage[-1]

    def finetune_encoder(self, model: nn.Module) -> nn.Module:
        return model.encoder.net

    def layer_groups(self) -> dict:
        return {"stem": r"^encoder\.net\.stem", "blocks": r"^encoder\.net\.stages\.(\d+)"}

    def build_pretext(self, stage: str = "vertebrae") -> nn.Module:
        from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

        kwargs = resenc_kwargs(self.params)
        unet = ResidualEncoderUNet(**kwargs, num_classes=1, n_conv_per_stage_decoder=[1] * (kwargs["n_stages"] - 1))
        return ResEncMAE(unet, self.params.mask_block, self.params.mask_ratio)


# ---- Primus-M -------------------------------------------------------------------------------------

@dataclass
class PrimusParams:
    embed_dim: int = 864
    depth: int = 16
    num_heads: int = 12
    patch_size: int = 8
    drop_path: float = 0.0
    mask_ratio: float = 0.75
    decoder_depth: int = 2  # the pretext's Eva decoder blocks (nnssl's BaseEvaMAETrainer: 2, at the encoder's heads)
    # nnssl's BaseEvaMAETrainer builds Primus-M's Eva (encoder and decoder) with layer scale
    # (`gamma_1`, `gamma_2`, initialised to 0.1) and a norm inside each attention (`attn.norm`):
    # without them a published file cannot load whole. 0 turns layer scale off.
    init_values: float = 0.1
    scale_attn_inner: bool = True


class PrimusEncoder(nn.Module):
    """Primus' patch embedding and Eva encoder; the tokens' mean is the feature vector."""

    def __init__(self, primus: nn.Module) -> None:
        super().__init__()
        self.down_projection = primus.down_projection
        self.eva = primus.eva

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = rearrange(self.down_projection(zscore(x)), "b c w h d -> b (w h d) c")
        return self.eva(tokens)[0].mean(dim=1)


class PrimusMAE(MaskedReconstruction):
    """nnssl's Eva MAE: `mask_ratio` of the patch tokens dropped after the position embeddings (the
    rotary ones follow the kept tokens), the Eva encoder runs on the rest, a learned mask token fills
    the dropped places, an Eva decoder runs on the full sequence and Primus' patch decoder restores
    the image; MSE on the dropped patches. The dropping is done here rather than by Eva's
    `patch_drop_rate`, whose timm call has changed."""

    def __init__(self, primus: nn.Module, ratio: float, decoder: nn.Module) -> None:
        super().__init__()
        self.encoder = PrimusEncoder(primus)  # the finetuning encoder's modules and key names
        self.decoder = decoder
        self.up_projection = primus.up_projection
        self.ratio = ratio
        self.mask_token = nn.Parameter(torch.zeros(1, 1, primus.embed_dim))
        nn.init.normal_(self.mask_token, std=0.02)

    def restore(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z-scored image, kept-voxel mask, the restored image)."""
        from timm.layers import apply_keep_indices_nlc

        image = zscore(x.float())
        net = self.encoder
        grid = net.down_projection(image.to(x.dtype))
        b, c, w, h, d = grid.shape
        tokens, rope, _ = net.eva._pos_embed(rearrange(grid, "b c w h d -> b (w h d) c"))
        n = tokens.shape[1]
        keep = torch.rand(b, n, device=x.device).argsort(dim=1)[:, : max(1, round(n * (1 - self.ratio)))]
        keep = keep.sort(dim=1).values
        tokens = tokens.gather(1, keep[..., None].expand(-1, -1, c))
        if rope is not None:
            rope = apply_keep_indices_nlc(tokens, rope, keep).unsqueeze(1)  # (B, 1 head, kept, dim)
        for block in net.eva.blocks:
            tokens = block(tokens, rope=rope)
        tokens = net.eva.norm(tokens)
        full = self.mask_token.to(tokens.dtype).expand(b, n, c).clone()
        full = full.scatter(1, keep[..., None].expand(-1, -1, c), tokens)
        full = self.decoder(full)[0]
        restored = self.up_projection(rearrange(full, "b (w h d) c -> b c w h d", w=w, h=h, d=d)).float()
        kept = torch.zeros(b, n, device=x.device).scatter(1, keep, 1.0).view(b, 1, w, h, d)
        for axis, size in zip((2, 3, 4), image.shape[2:]):
            kept = kept.repeat_interleave(size // kept.shape[axis], dim=axis)
        return image, kept, restored

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        image, kept, restored = self.restore(x)
        hidden = 1.0 - kept
        return {"loss": ((restored - image) ** 2 * hidden).sum() / hidden.sum()}

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, kept, restored = self.restore(x)
        return shown_in_input_scale(x, kept, restored)


def convert_primus(state: dict[str, torch.Tensor], target: nn.Module) -> dict[str, torch.Tensor]:
    """The plan's learned position embedding, interpolated from the pretraining token grid (160^3 /
    8 for the OpenMind files) to the finetuning one."""
    own = target.state_dict().get("eva.pos_embed")
    pos = state.get("eva.pos_embed")
    if own is None or pos is None or pos.shape == own.shape or pos.shape[-1] != own.shape[-1]:
        return state
    side = round(own.shape[1] ** (1 / 3))
    return {**state, "eva.pos_embed": resize_pos_embed_3d(pos, (side,) * 3)}


@register_method("openmind_primusm")
class OpenMindPrimusM(Method):
    architecture = "transformer"
    description = "OpenMind / nnssl Primus-M (Eva ViT) encoder, MAE pretraining (Wald et al., ICCV 2025)"
    regimes = ("scratch", "public", "public_to_vertebrae")
    Params = PrimusParams
    presets = {
        "tiny": {"lr": 1.0e-3, "model": {"embed_dim": 48, "depth": 2, "num_heads": 2, "decoder_depth": 1}},
        # the transformers' recipe at lr 1e-3, and 16^3 patches (27 tokens of a 48^3 crop): at the recipe's
        # lr, or with Primus' 8^3 patches, the small Primus did not learn in six epochs (docs/configuration.md,
        # "Why the per-method presets"). Primus' patch decoder takes powers of two only, so 12^3 is not open.
        "small": {**TRANSFORMER_FINETUNE, "lr": 1.0e-3, "model": {"embed_dim": 192, "depth": 6, "num_heads": 4,
                                                                         "patch_size": 16, "decoder_depth": 1}},
    }
    public_weights = WeightsSpec(
        filename="PrimusM-OpenMind-MAE (checkpoint_final.pth)", url="", sha256="",
        hf_repo="MIC-DKFZ/PrimusM-OpenMind-MAE", hf_file="checkpoint_final.pth",
        licence="CC-BY-4.0 (Hugging Face model card)",
        trained_on="OpenMind: 114k public 3D brain MRI volumes, 23 MRI modalities (nnssl MAE); no CT",
        layout="{'network_weights': {'down_projection.*', 'eva.pos_embed', 'eva.blocks.{0-15}.*', 'eva.norm.*', "
               "'decoder.*', 'mask_token', ...}, 'nnssl_adaptation_plan': {'architecture_plans': {'arch_class_name': "
               "'PrimusM'}, 'key_to_encoder': 'eva', 'key_to_stem': 'down_projection', 'key_to_lpe': "
               "'eva.pos_embed', ...}}",
        convert=convert_primus,
        unwrap=lambda obj: read_adaptation_plan(obj, ("Primus",), ("down_projection", "eva"), "openmind_primusm"),
    )

    def make_primus(self) -> nn.Module:
        from dynamic_network_architectures.architectures.primus import Primus

        p = self.params
        if self.cfg.crop_size % p.patch_size:
            raise BenchError(f"{self.name}: crop_size {self.cfg.crop_size} is not a multiple of model.patch_size "
                             f"{p.patch_size}")
        if p.patch_size < 2 or p.patch_size & (p.patch_size - 1):  # Primus' patch decoder doubles per stage
            raise BenchError(f"{self.name}: model.patch_size must be a power of two (got {p.patch_size})")
        head = p.embed_dim / p.num_heads
        if head != int(head) or head % 6:  # Eva's 3D RoPE takes two thirds of each head, in multiples of 4
            raise BenchError(f"{self.name}: model.embed_dim / model.num_heads must be a whole multiple of 6 "
                             f"(got {p.embed_dim} / {p.num_heads})")
        return Primus(input_channels=1, embed_dim=p.embed_dim, patch_embed_size=(p.patch_size,) * 3, num_classes=1,
                      eva_depth=p.depth, eva_numheads=p.num_heads, input_shape=(self.cfg.crop_size,) * 3,
                      drop_path_rate=p.drop_path, init_values=p.init_values or None,
                      scale_attn_inner=p.scale_attn_inner)

    def build_encoder(self) -> tuple[nn.Module, int]:
        return PrimusEncoder(self.make_primus()), self.params.embed_dim

    def layer_groups(self) -> dict:
        return {"stem": r"^encoder\.(?:down_projection|eva\.pos_embed)", "blocks": r"^encoder\.eva\.blocks\.(\d+)"}

    def cam_layer(self, model: nn.Module) -> str:
        """No attention maps are extracted from Eva's blocks: Grad-CAM on the patch embedding's grid."""
        return "encoder.down_projection"

    def build_pretext(self, stage: str = "vertebrae") -> nn.Module:
        from dynamic_network_architectures.building_blocks.eva import Eva

        p = self.params
        if p.decoder_depth < 1:
            raise BenchError(f"{self.name}: model.decoder_depth must be at least 1 (got {p.decoder_depth}): without "
                             f"the Eva decoder no masked patch sees a kept one")
        side = self.cfg.crop_size // p.patch_size
        decoder = Eva(embed_dim=p.embed_dim, depth=p.decoder_depth, num_heads=p.num_heads, ref_feat_shape=(side,) * 3,
                      use_rot_pos_emb=True, use_abs_pos_emb=True, mlp_ratio=4 * 2 / 3, drop_path_rate=p.drop_path,
                      init_values=p.init_values or None, scale_attn_inner=p.scale_attn_inner)
        return PrimusMAE(self.make_primus(), p.mask_ratio, decoder)
