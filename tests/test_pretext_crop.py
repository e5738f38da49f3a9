"""`pretrain.crop_size`: a pretext of an any-size encoder sees random sub-crops at the run's spacing,
its artifact says so, and a method tied to its input size refuses the key."""
import numpy as np
import pytest
import torch

from bench.cli import main
from bench.config import compose
from bench.datasets.pretext import OrganCorpus, VolumeCorpus, pretext_dataset, random_subcrop
from bench.errors import BenchError
from bench.registry import create_method, get_method


def _method(name: str, **overrides: str):
    cfg = compose({"method": name, "regime": "public", "preset": "tiny", "progress": "false", **overrides},
                  get_method(name))
    return create_method(name, cfg), cfg


def test_a_subcrop_is_one_window_of_every_array_and_follows_the_seed():
    x = np.arange(48**3, dtype=np.float32).reshape(48, 48, 48)
    labels = (x % 7).astype(np.int64)
    a, b = random_subcrop((x, labels), 32, np.random.default_rng(3))
    assert a.shape == b.shape == (32, 32, 32)
    i, j, k = np.unravel_index(int(a[0, 0, 0]), x.shape)
    window = (slice(i, i + 32), slice(j, j + 32), slice(k, k + 32))
    assert np.array_equal(a, x[window]) and np.array_equal(b, labels[window])
    (again,) = random_subcrop((x,), 32, np.random.default_rng(3))
    assert np.array_equal(again, a)
    assert random_subcrop((x,), None, np.random.default_rng(3))[0] is x


def test_the_corpora_take_subcrops_and_vary_them_by_epoch():
    images = np.random.default_rng(0).integers(-1000, 1000, (2, 48, 48, 48)).astype(np.int16)
    volumes = VolumeCorpus(images, np.arange(2), 48, seed=0, edge=32)
    first = volumes[0]
    assert first.shape == (1, 32, 32, 32)
    volumes.epoch = 1
    assert not torch.equal(volumes[0], first)
    organs = OrganCorpus(images, (images > 0).astype(np.int64), seed=0, edge=32)
    patch, label = organs[1]
    assert patch.shape == (1, 32, 32, 32) and label.shape == (32, 32, 32)


@pytest.mark.parametrize("name", ["swin_unetr", "voco", "suprem", "suprem_unet"])
def test_the_any_size_pretexts_train_on_32_voxel_subcrops_of_48_voxel_crops(name):
    method, cfg = _method(name, crop_size="48", **{"pretrain.crop_size": "32"})
    dataset, spec = pretext_dataset(method, cfg, "public", 0)
    assert spec["pretext_crop_size"] == 32 and spec["crop_size"] == 48
    sample = dataset[0][0] if isinstance(dataset[0], tuple) else dataset[0]
    assert sample.shape[-3:] == (32, 32, 32)
    from torch.utils.data import default_collate

    pretext = method.make_pretext("public")
    loss = pretext.step(pretext, default_collate([dataset[0], dataset[1]]))["loss"]
    assert torch.isfinite(loss)


def test_the_small_preset_pretrains_the_any_size_methods_on_32_voxel_subcrops():
    for name in ("swin_unetr", "voco", "suprem", "suprem_unet"):
        cfg = compose({"method": name, "preset": "small"}, get_method(name))
        assert (cfg.crop_size, cfg.pretrain.crop_size) == (48, 32), name


def test_a_method_tied_to_its_input_size_refuses_the_key():
    method, cfg = _method("mae3d", crop_size="48", **{"pretrain.crop_size": "32"})
    with pytest.raises(BenchError, match=r"'pretrain.crop_size': 32; method 'mae3d' pretrains on the run's crop"):
        pretext_dataset(method, cfg, "public", 0)


def test_a_pretext_crop_above_the_run_crop_or_off_swins_grid_is_one_line(tmp_path, capsys):
    assert main(["run", "method=swin_unetr", "regime=public", "preset=tiny", "pretrain.crop_size=48",
                 f"out={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'pretrain.crop_size': 48" in err[0] and "at most crop_size (32)" in err[0]
    method, _ = _method("swin_unetr", crop_size="48", **{"pretrain.crop_size": "40"})
    with pytest.raises(BenchError, match=r"'pretrain.crop_size': 40; swin_unetr needs a multiple of 16"):
        method.build_pretext("public")
