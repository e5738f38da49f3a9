"""Models Genesis (Zhou et al.): `models_genesis`, and the Engstler et al. classifier (`engstler`).

The network is the published UNet3D, with its exact layer names and channel plan, so that
`Genesis_Chest_CT.pt` loads unchanged: encoder `down_tr64` (1->32->64), `down_tr128` (64->64->128),
`down_tr256` (128->128->256), `down_tr512` (256->256->512), each conv 3x3x3 + BatchNorm `bn1` +
ReLU, max-pooling after the first three; decoder `up_tr256/128/64` (transposed conv + two convs on
the skip concatenation) and `out_tr.final_conv` (1x1, sigmoid). `model.width` scales every channel
count for the CPU presets (the public weights need 1.0).

Pretext (restoration, MSE): flips (up to 3, each with p 0.4, applied to input and target), local
voxel shuffling (p 0.5), a non-linear intensity map through a random Bezier curve (p 0.9), and in-
or out-painting (p 0.9; out-painting 0.8 of those). The original normalises with batch statistics
even at evaluation (`model.bn_batch_stats=true`); the default uses running statistics, so that a
vertebra's prediction does not depend on the other vertebrae in its batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.errors import BenchError
from bench.methods.base import Method
from bench.methods.pretext import PretextTask
from bench.registry import register_method
from bench.weights import WeightsSpec


class ContBatchNorm3d(nn.BatchNorm3d):
    """BatchNorm3d that can always normalise with batch statistics (the original's behaviour)."""

    def __init__(self, channels: int, batch_stats: bool) -> None:
        super().__init__(channels)
        self.batch_stats = batch_stats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_stats:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True,
                                self.momentum, self.eps)
        return super().forward(x)


class LUConv(nn.Module):
    def __init__(self, cin: int, cout: int, batch_stats: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, kernel_size=3, padding=1)
        self.bn1 = ContBatchNorm3d(cout, batch_stats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(self.conv1(x)))


class DownTransition(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, pool: bool, batch_stats: bool) -> None:
        super().__init__()
        self.ops = nn.Sequential(LUConv(cin, mid, batch_stats), LUConv(mid, cout, batch_stats))
        self.pool = pool

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skip = self.ops(x)
        return (F.max_pool3d(skip, 2) if self.pool else skip), skip


class UpTransition(nn.Module):
    def __init__(self, cin: int, skip: int, cout: int, batch_stats: bool) -> None:
        super().__init__()
        self.up_conv = nn.ConvTranspose3d(cin, cin, kernel_size=2, stride=2)
        self.ops = nn.Sequential(LUConv(cin + skip, cout, batch_stats), LUConv(cout, cout, batch_stats))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.ops(torch.cat([self.up_conv(x), skip], dim=1))


class OutTransition(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.final_conv = nn.Conv3d(cin, 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.final_conv(x))


def scaled_channels(n: int, width: float) -> int:
    """A published channel count `n` narrowed by `width` (at least 4)."""
    return max(4, int(round(n * width)))


class GenesisEncoder(nn.Module):
    """down_tr64 .. down_tr512; `forward` returns the deepest features (B, 512w, D/8, H/8, W/8)."""

    def __init__(self, width: float = 1.0, batch_stats: bool = False) -> None:
        super().__init__()
        c = lambda n: scaled_channels(n, width)  # noqa: E731
        self.out_channels = c(512)
        self.down_tr64 = DownTransition(1, c(32), c(64), True, batch_stats)
        self.down_tr128 = DownTransition(c(64), c(64), c(128), True, batch_stats)
        self.down_tr256 = DownTransition(c(128), c(128), c(256), True, batch_stats)
        self.down_tr512 = DownTransition(c(256), c(256), c(512), False, batch_stats)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for block in (self.down_tr64, self.down_tr128, self.down_tr256, self.down_tr512):
            x, skip = block(x)
            skips.append(skip)
        return x, skips

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)[0]


class UNet3D(GenesisEncoder):
    """The full Models Genesis network: the encoder's keys plus up_tr256/128/64 and out_tr."""

    def __init__(self, width: float = 1.0, batch_stats: bool = False) -> None:
        super().__init__(width, batch_stats)
        c = lambda n: scaled_channels(n, width)  # noqa: E731
        self.up_tr256 = UpTransition(c(512), c(256), c(256), batch_stats)
        self.up_tr128 = UpTransition(c(256), c(128), c(128), batch_stats)
        self.up_tr64 = UpTransition(c(128), c(64), c(64), batch_stats)
        self.out_tr = OutTransition(c(64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        deep, skips = self.features(x)
        x = self.up_tr256(deep, skips[2])
        x = self.up_tr128(x, skips[1])
        x = self.up_tr64(x, skips[0])
        return self.out_tr(x)


# ---- pretext transforms (per sample, on the device, drawn from torch's seeded RNG) ----------------

def _rand() -> float:
    return float(torch.rand(()))


def _bezier_map(x: torch.Tensor) -> torch.Tensor:
    """Monotonic intensity remapping through a cubic Bezier curve with random inner control points."""
    pts = torch.tensor([[0.0, 0.0], [_rand(), _rand()], [_rand(), _rand()], [1.0, 1.0]], device=x.device)
    t = torch.linspace(0, 1, 1000, device=x.device)[:, None]
    curve = ((1 - t) ** 3 * pts[0] + 3 * (1 - t) ** 2 * t * pts[1] + 3 * (1 - t) * t**2 * pts[2] + t**3 * pts[3])
    xs, ys = curve[:, 0], curve[:, 1]
    order = torch.argsort(xs)
    xs, ys = xs[order], ys[order]
    if _rand() < 0.5:
        ys = 1 - ys  # inverted intensity, as the original does half of the time
    idx = torch.clamp(torch.searchsorted(xs, x.clamp(0, 1).contiguous()), 1, len(xs) - 1)
    x0, x1, y0, y1 = xs[idx - 1], xs[idx], ys[idx - 1], ys[idx]
    w = (x - x0) / (x1 - x0).clamp_min(1e-6)
    return y0 + w.clamp(0, 1) * (y1 - y0)


def _local_shuffle(x: torch.Tensor) -> torch.Tensor:
    """Shuffle the voxels inside many small random boxes (up to a tenth of each edge), one after the
    other as the original does (1000 boxes per 64x64x32 voxels). The loop runs in numpy, much
    faster than the same loop of small torch ops, on a generator seeded from torch's."""
    rng = np.random.default_rng(int(torch.randint(0, 2**62, ())))
    out = x.detach().cpu().numpy().copy()
    d, h, w = out.shape[-3:]
    n_blocks = max(10, int(1000 * out[0].size / (64 * 64 * 32)))
    sizes = np.stack([rng.integers(1, max(2, s // 10) + 1, n_blocks) for s in (d, h, w)], axis=1)
    starts = np.stack([rng.integers(0, s - sizes[:, i] + 1) for i, s in enumerate((d, h, w))], axis=1)
    for (bd, bh, bw), (z, y, xx) in zip(sizes, starts):
        block = out[:, z:z + bd, y:y + bh, xx:xx + bw]
        out[:, z:z + bd, y:y + bh, xx:xx + bw] = rng.permutation(block.reshape(-1)).reshape(block.shape)
    return torch.from_numpy(out).to(x.device)


def _paint(x: torch.Tensor) -> torch.Tensor:
    d, h, w = x.shape[-3:]

    def box(lo: float, hi: float) -> tuple[slice, slice, slice]:
        sizes = [int(torch.randint(int(s * lo), max(int(s * lo) + 1, int(s * hi)), ())) for s in (d, h, w)]
        starts = [int(torch.randint(0, s - b + 1, ())) for s, b in zip((d, h, w), sizes)]
        return tuple(slice(st, st + b) for st, b in zip(starts, sizes))  # type: ignore[return-value]

    if _rand() < 0.8:  # out-painting: noise everywhere but a few windows of the image
        out = torch.rand_like(x)
        for _ in range(int(torch.randint(1, 5, ()))):
            sl = box(3 / 7, 4 / 7)
            out[(slice(None), *sl)] = x[(slice(None), *sl)]
        return out
    out = x.clone()  # in-painting: a few windows replaced by noise
    for _ in range(int(torch.randint(1, 6, ()))):
        sl = box(1 / 6, 1 / 3)
        out[(slice(None), *sl)] = torch.rand_like(out[(slice(None), *sl)])
    return out


def genesis_transform(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(transformed input, restoration target) of one sample (C, D, H, W) in [0, 1]."""
    target = x
    for _ in range(3):  # flips: augmentation of input and target alike
        if _rand() >= 0.4:
            break
        axis = 1 + int(torch.randint(0, 3, ()))
        target = torch.flip(target, dims=(axis,))
    y = target
    if _rand() < 0.5:
        y = _local_shuffle(y)
    if _rand() < 0.9:
        y = _bezier_map(y)
    if _rand() < 0.9:
        y = _paint(y)
    return y, target


def random_cube(x: torch.Tensor, size: int) -> torch.Tensor:
    """A random size^3 sub-volume of one sample (C, D, H, W); the whole sample when size is 0."""
    if not size or all(s <= size for s in x.shape[-3:]):
        return x
    starts = [int(torch.randint(0, s - size + 1, ())) for s in x.shape[-3:]]
    return x[:, starts[0]:starts[0] + size, starts[1]:starts[1] + size, starts[2]:starts[2] + size]


ENCODER_BLOCKS = ("down_tr64.", "down_tr128.", "down_tr256.", "down_tr512.")  # the U-Net's encoder half


class GenesisPretext(PretextTask):
    """Restoration of transformed sub-volumes (the original cuts 64x64x32 cubes out of its CTs;
    `size` does the same to the corpus crops, 0 keeps them whole)."""

    def __init__(self, unet: UNet3D, size: int = 0) -> None:
        super().__init__()
        self.unet = unet
        self.size = size

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        pairs = [genesis_transform(random_cube(s, self.size)) for s in x.float()]
        inputs = torch.stack([p[0] for p in pairs]).to(x.dtype)
        targets = torch.stack([p[1] for p in pairs])
        restored = self.unet(inputs)
        return {"loss": F.mse_loss(restored.float(), targets.float())}

    def pretrained_encoder(self) -> nn.Module:
        return self.unet  # public weights fill the whole UNet, decoder included

    def encoder_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.unet.state_dict().items() if k.startswith(ENCODER_BLOCKS)}


def convert_genesis(state: dict[str, torch.Tensor], target: nn.Module) -> dict[str, torch.Tensor]:
    """Genesis_Chest_CT.pt ({'state_dict': {'module.down_tr64...'}}, prefix already stripped) ->
    the keys `target` has: the encoder's 56, or all 106 for the full UNet."""
    own = target.state_dict()
    return {k: v for k, v in state.items() if k in own}


GENESIS_WEIGHTS = WeightsSpec(
    filename="Genesis_Chest_CT.pt",
    url="https://github.com/MrGiovanni/ModelsGenesis (pretrained_weights/Genesis_Chest_CT.pt)",
    sha256="",
    layout="{'epoch', 'state_dict': {'module.down_tr64.ops.0.conv1.weight', ...}, 'optimizer_state_dict'}",
    convert=convert_genesis,
    trained_on="623 chest CTs (LUNA16)",
)


@dataclass
class GenesisParams:
    width: float = 1.0
    bn_batch_stats: bool = False
    head_hidden: int = 1024
    pretext_size: int = 0  # pretext on random cubes of this edge (a multiple of 8); 0: whole crops


class GenesisEncoderPooled(nn.Module):
    """Encoder + global average pooling over out512, the features of the two-layer head."""

    def __init__(self, encoder: GenesisEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x).mean(dim=(2, 3, 4))


@register_method("models_genesis")
class ModelsGenesis(Method):
    channels_last = True
    description = "Models Genesis UNet3D encoder, restoration pretext (Table 3)"
    regimes = ("scratch", "public", "public_to_vertebrae")
    Params = GenesisParams
    public_weights = GENESIS_WEIGHTS
    presets = {
        "tiny": {"model": {"width": 0.125, "head_hidden": 64}},
        "small": {"amp": True, "model": {"width": 0.125, "head_hidden": 128, "pretext_size": 32}},
    }

    def build_encoder(self) -> tuple[nn.Module, int]:
        enc = GenesisEncoder(self.params.width, self.params.bn_batch_stats)
        return GenesisEncoderPooled(enc), enc.out_channels

    def build_head(self, in_features: int, num_classes: int) -> nn.Module:
        hidden = self.params.head_hidden  # the CPU presets shrink it together with the width
        return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes))

    def build_pretext(self, stage: str = "vertebrae") -> nn.Module:
        size = self.params.pretext_size
        if size % 8 or size < 0:
            raise BenchError(f"model.pretext_size={size}: expected 0 or a positive multiple of 8 (three poolings)")
        return GenesisPretext(UNet3D(self.params.width, self.params.bn_batch_stats), size)

    def finetune_encoder(self, model: nn.Module) -> nn.Module:
        return model.encoder.encoder  # the GenesisEncoder inside the pooling wrapper: same key names


class CentreCrop3d(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        starts = [(s - self.size) // 2 for s in x.shape[-3:]]
        return x[..., starts[0]:starts[0] + self.size, starts[1]:starts[1] + self.size, starts[2]:starts[2] + self.size]


class EngstlerEncoder(nn.Module):
    """64^3 centre crop (2/3 of the crop edge) -> Genesis encoder -> four 3x3x3 convs
    (512->256->128->64->8, InstanceNorm, LeakyReLU, dropout between them) -> flatten."""

    def __init__(self, crop: int, width: float, dropout: float) -> None:
        super().__init__()
        self.crop = CentreCrop3d(crop)
        self.encoder = GenesisEncoder(width)
        chans = [self.encoder.out_channels, *(scaled_channels(n, width) for n in (256, 128, 64)), 8]
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(chans[:-1], chans[1:])):
            layers += [nn.Conv3d(cin, cout, 3, padding=1), nn.InstanceNorm3d(cout, affine=True),
                       nn.LeakyReLU(inplace=True)]
            # Element-wise dropout between the convs. Channel dropout (Dropout3d), or any dropout on
            # the final 8-channel map that feeds the BatchNorm MLP, stopped the head from fitting
            # even 16 samples (training loss stuck at ln 2 on the synthetic benchmark).
            if i < len(chans) - 2:
                layers.append(nn.Dropout(dropout))
        self.convs = nn.Sequential(*layers)
        self.out_features = 8 * (crop // 8) ** 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(self.encoder(self.crop(x))).flatten(1)


@dataclass
class EngstlerParams:
    width: float = 1.0
    dropout: float = 0.3


@register_method("engstler")
class Engstler(Method):
    channels_last = True
    description = "Engstler et al. 2022: Genesis encoder + conv/MLP head on a 64^3 centre crop (Table 4)"
    regimes = ("scratch",)
    Params = EngstlerParams
    # small: 30 epochs, not the preset's 6: from scratch the BatchNorm MLP head holds the training loss
    # at ln 2 for about half of them before encoder and head align (docs/configuration.md, "Why the
    # per-method presets").
    presets = {"tiny": {"model": {"width": 0.125}},
               "small": {"amp": True, "epochs": 30, "model": {"width": 0.125}}}

    def build_encoder(self) -> tuple[nn.Module, int]:
        crop = max(8, int(round(self.cfg.crop_size * 2 / 3 / 8)) * 8)
        enc = EngstlerEncoder(crop, self.params.width, self.params.dropout)
        return enc, enc.out_features

    def build_head(self, in_features: int, num_classes: int) -> nn.Module:
        layers: list[nn.Module] = []
        for cin, cout in zip((in_features, 256, 128), (256, 128, 64)):
            layers += [nn.Linear(cin, cout), nn.BatchNorm1d(cout), nn.LeakyReLU(inplace=True)]
        return nn.Sequential(*layers, nn.Linear(64, num_classes))
