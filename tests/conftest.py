"""Shared fixtures: one synthetic-data cache per test session, and a CLI runner."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from torch import nn

from bench import register_method
from bench.methods.base import Method


@pytest.fixture(scope="session", autouse=True)
def bench_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test shares one cache, so the tiny synthetic set is generated once per session."""
    cache = tmp_path_factory.mktemp("bench-cache")
    os.environ["BENCH_CACHE"] = str(cache)
    return cache


@register_method("_test_tiny_cnn")
class TinyTestCNN(Method):
    """Two strided convolutions: for engine paths whose cost grows with the model (torch.compile)."""

    description = "test-only"

    def build_encoder(self) -> tuple[nn.Module, int]:
        net = nn.Sequential(nn.Conv3d(1, 4, 3, stride=2, padding=1), nn.ReLU(),
                            nn.Conv3d(4, 8, 3, stride=2, padding=1), nn.ReLU(),
                            nn.AdaptiveAvgPool3d(1), nn.Flatten())
        return net, 8


@register_method("_test_tiny_video")
class TinyTestVideo(Method):
    """A tiny model on slice views (C, T, H, W): exercises the engine's video-format path."""

    description = "test-only"
    input_format = "slices"

    def build_encoder(self) -> tuple[nn.Module, int]:
        net = nn.Sequential(nn.Conv3d(3, 4, (2, 4, 4), stride=(2, 4, 4)), nn.ReLU(),
                            nn.AdaptiveAvgPool3d(1), nn.Flatten())
        return net, 4
