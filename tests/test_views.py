import numpy as np
import pytest
import torch
from torch import nn

from bench.datasets import views
from bench.datasets.torch_data import SliceViewDataset
from bench.evaluation import forward_views


def test_positions_follow_the_public_rule():
    pos = views.slice_positions(96, 16)
    np.testing.assert_array_equal(pos, np.round(np.linspace(0, 95, 18)).astype(int)[1:-1])
    assert len(pos) == 16 and pos[0] > 0 and pos[-1] < 95


@pytest.mark.parametrize("depth, expected", [(96, (5, 6)), (48, (2, 3)), (32, (2, 2))])
def test_number_of_views(depth, expected):
    s = views.shifts(depth, 16)
    assert expected[0] <= len(s) <= expected[1]
    pos = views.slice_positions(depth, 16)
    assert min(s) + pos[0] >= 0 and max(s) + pos[-1] <= depth - 1
    spacing = pos[1] - pos[0]
    assert s == [x for x in range(-spacing // 2, spacing // 2) if 0 <= pos[0] + x and pos[-1] + x < depth]


@pytest.mark.parametrize("axis, dim", [("sagittal", 0), ("coronal", 1), ("axial", 2)])
def test_views_cut_the_named_axis(axis, dim):
    vol = np.zeros((40, 40, 40), np.float32)
    index = [slice(None)] * 3
    index[dim] = np.arange(40)
    marker = np.arange(40, dtype=np.float32).reshape([-1 if d == dim else 1 for d in range(3)])
    vol = vol + marker  # value = coordinate along `dim`
    frames = views.take_view(vol, axis, 16, shift=1)
    assert frames.shape == (16, 40, 40)
    np.testing.assert_array_equal(frames[:, 0, 0], views.slice_positions(40, 16) + 1)
    assert (frames == frames[:, :1, :1]).all()  # each frame is one slice


def test_clip_padding_is_centred_zero():
    frames = np.ones((16, 96, 96), np.float32)
    clip = views.to_clip(frames, frame_size=224)
    assert clip.shape == (3, 16, 224, 224)
    assert clip[:, :, 64:160, 64:160].min() == 1 and clip.sum() == 3 * 16 * 96 * 96


def test_dataset_train_and_multi_view_eval():
    images = np.random.default_rng(0).integers(-1000, 1000, size=(2, 48, 48, 48)).astype(np.int16)
    train = SliceViewDataset(images, np.arange(2), np.array([0, 1]), augment=True, frames=16)
    x, _ = train[0]
    assert x.shape == (3, 16, 48, 48)
    evaluation = SliceViewDataset(images, np.arange(2), np.array([0, 1]), frames=16, multi_view=True)
    x, _ = evaluation[1]
    assert x.shape == (len(views.shifts(48, 16)), 3, 16, 48, 48)
    single = SliceViewDataset(images, np.arange(2), np.array([0, 1]), frames=16, multi_view=False, frame_size=64)
    assert single[1][0].shape == (3, 16, 64, 64)


class _PerViewLogits(nn.Module):
    """Logits = (mean of the clip, 0): a model whose output is known for every view."""

    def forward(self, x):
        return torch.stack([x.mean(dim=(1, 2, 3, 4)), torch.zeros(len(x))], dim=1)


def test_multi_view_logits_are_averaged():
    x = torch.stack([torch.full((3, 2, 4, 4), float(v)) for v in range(6)])[None].repeat(2, 1, 1, 1, 1, 1)
    x[1] *= 2
    logits = forward_views(_PerViewLogits(), x)
    torch.testing.assert_close(logits[:, 0], torch.tensor([2.5, 5.0]))  # mean of 0..5, and of 0..10


def test_slice_method_runs_end_to_end_with_multi_view(tmp_path):
    import json

    from bench.cli import main

    assert main(["run", "method=_test_tiny_video", "preset=tiny", "epochs=1", f"out={tmp_path}",
                 "views.axis=coronal", "views.frame_size=40"]) == 0
    folder = tmp_path / "single" / "_test_tiny_video-scratch-s0"
    assert json.loads((folder / "metrics.json").read_text())["test"]["n"] > 0
    assert "axis: coronal" in (folder / "config.yaml").read_text()  # the axis is recorded


@pytest.mark.parametrize("axis", ["sagittal", "coronal", "axial"])
def test_views_of_a_flipped_crop_are_the_views_of_the_mirrored_crop(axis):
    """Reading only the sampled slices must give what flipping the whole cube first would give."""
    from bench.datasets.torch_data import scale_hu

    rng = np.random.default_rng(1)
    images = rng.integers(-1000, 1000, size=(4, 48, 48, 48)).astype(np.int16)
    ds = SliceViewDataset(images, np.arange(4), np.zeros(4), augment=True, frames=16, channels=1, axis=axis)
    for index in range(4):
        for epoch in range(3):
            ds.epoch = epoch
            clip = ds[index][0].numpy()[0]
            draw = np.random.default_rng([0, epoch, index])
            flip = draw.random() < 0.5
            options = views.shifts(48, 16)
            shift = options[int(draw.integers(len(options)))]
            volume = scale_hu(images[index][::-1] if flip else images[index])
            np.testing.assert_array_equal(clip, views.take_view(volume, axis, 16, shift))
