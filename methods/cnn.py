"""3D CNN baselines of the paper's Table 4: MONAI DenseNet-121/169 and ResNet-18/50, from scratch.

The `paper` preset keeps the published architectures; `tiny` and `small` shrink their width (and
ResNet's first-layer stride, whose MONAI default of 1 is much slower) so that they run on a CPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from monai.networks.nets import DenseNet, ResNet
from torch import nn

from bench.methods.base import Method
from bench.registry import register_method


@dataclass
class DenseNetParams:
    init_features: int = 64
    growth_rate: int = 32
    block_config: list[int] = field(default_factory=lambda: [6, 12, 24, 16])
    dropout: float = 0.0


class _DenseNet(Method):
    channels_last = True
    Params = DenseNetParams
    # small: 30 epochs, not the preset's 6: from scratch the narrowed DenseNets are still near chance on
    # validation after six (measured: docs/configuration.md, "Why the per-method presets").
    presets = {
        "tiny": {"model": {"init_features": 16, "growth_rate": 8}},
        "small": {"amp": True, "epochs": 30, "model": {"init_features": 16, "growth_rate": 8}},
    }

    def build_encoder(self) -> tuple[nn.Module, int]:
        p = self.params
        net = DenseNet(
            spatial_dims=3, in_channels=1, out_channels=2, init_features=p.init_features,
            growth_rate=p.growth_rate, block_config=tuple(p.block_config), dropout_prob=p.dropout,
        )
        # MONAI's class_layers = relu -> pool -> flatten -> out; everything but `out` is the encoder.
        layers = net.class_layers
        encoder = nn.Sequential(net.features, layers.relu, layers.pool, layers.flatten)
        return encoder, layers.out.in_features


@register_method("densenet121")
class DenseNet121(_DenseNet):
    description = "MONAI 3D DenseNet-121 from scratch (Table 4)"


@register_method("densenet169")
class DenseNet169(_DenseNet):
    description = "MONAI 3D DenseNet-169 from scratch (Table 4)"

    @dataclass
    class Params(DenseNetParams):
        block_config: list[int] = field(default_factory=lambda: [6, 12, 32, 32])


@dataclass
class ResNetParams:
    widen_factor: float = 1.0
    conv1_t_size: int = 7
    conv1_t_stride: int = 1  # MONAI's (and MedicalNet's) default; the CPU presets use 2
    no_max_pool: bool = False


class _ResNet(Method):
    channels_last = True
    Params = ResNetParams
    block: str = "basic"
    layers: tuple[int, ...] = (2, 2, 2, 2)
    presets = {
        "tiny": {"model": {"widen_factor": 0.25, "conv1_t_stride": 2}},
        "small": {"amp": True, "model": {"widen_factor": 0.25, "conv1_t_stride": 2}},
    }

    def build_encoder(self) -> tuple[nn.Module, int]:
        p = self.params
        net = ResNet(
            block=self.block, layers=list(self.layers), block_inplanes=[64, 128, 256, 512],
            spatial_dims=3, n_input_channels=1, conv1_t_size=p.conv1_t_size,
            conv1_t_stride=p.conv1_t_stride, no_max_pool=p.no_max_pool, widen_factor=p.widen_factor,
            feed_forward=False,  # pooled features out; the head is ours
        )
        expansion = 4 if self.block == "bottleneck" else 1
        return net, int(512 * p.widen_factor) * expansion


@register_method("resnet18")
class ResNet18(_ResNet):
    description = "MONAI 3D ResNet-18 from scratch (Table 4)"


@register_method("resnet50")
class ResNet50(_ResNet):
    description = "MONAI 3D ResNet-50 from scratch (Table 4)"
    block = "bottleneck"
    layers = (3, 4, 6, 3)
