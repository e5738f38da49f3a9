import pytest

from bench.errors import BenchError
from bench.methods.base import Method
from bench.registry import Registry, list_datasets, list_methods


def test_builtin_methods_and_datasets():
    assert {"densenet121", "densenet169", "resnet18", "resnet50"} <= set(list_methods())
    assert "synthetic" in list_datasets()


def test_every_method_says_its_architecture():
    """The report groups where models look by architecture: every ViT, video ViT, Swin and Primus
    method says transformer, every other one convolutional."""
    from bench.registry import get_method

    transformers = {name for name in list_methods() if get_method(name).architecture == "transformer"}
    assert {get_method(name).architecture for name in list_methods()} <= {"transformer", "convolutional"}
    assert {"vit_b", "vit_l", "mae3d", "vit_unetr", "video_mae", "video_ct_mae", "swin_unetr", "suprem", "voco",
            "openmind_primusm", "spectre"} <= transformers
    assert not {"resnet18", "r3d_18", "ctfm", "openmind_resencl", "suprem_unet", "engstler", "merlin"} & transformers


def test_duplicate_name_is_an_error():
    reg = Registry("method", "bench.methods", "bench.no_such_group")

    @reg.register("dup")
    class A(Method):
        pass

    with pytest.raises(BenchError, match="duplicate method name 'dup'"):

        @reg.register("dup")
        class B(Method):
            pass


def test_unknown_name_lists_choices_and_close_match():
    reg = Registry("method", "bench.methods", "bench.no_such_group")
    reg.register("resnet18")(type("R", (Method,), {}))
    with pytest.raises(BenchError, match=r"unknown method 'resnet81'.*did you mean 'resnet18'"):
        reg.get("resnet81")


def test_no_top_level_datasets_or_methods_module(tmp_path):
    from tests_helpers import python_in

    out = python_in(tmp_path, "import importlib.util as u; print(u.find_spec('datasets'), u.find_spec('methods'))")
    assert out.strip() == "None None"


@pytest.mark.parametrize("preset", ["tiny", "small", "paper"])
def test_every_method_sees_one_input_geometry_per_preset(preset):
    """The report's tables compare the cells of one input geometry: at each preset every registered
    method sees the same crop (edge in voxels and field of view, hence spacing)."""
    from bench.config import compose
    from bench.registry import get_method

    geometry = {}
    for name in list_methods():
        if name.startswith("_"):
            continue
        cfg = compose({"method": name, "preset": preset}, get_method(name))
        geometry[name] = (cfg.crop_size, cfg.synthetic.fov_mm)
    assert len(set(geometry.values())) == 1, geometry


@pytest.mark.parametrize("name", ["swin_unetr", "voco", "suprem", "ctfm"])
def test_swin_and_ctfm_train_at_the_small_presets_48_voxel_crop(name):
    """Swin's last patch merging pads an odd stage (48 -> 24, 12, 6, 3 -> 2): the classifier, and each
    pretext (its decoder's output cut to the input, SuPreM's segmentation padded to 64), take 48^3."""
    import torch
    from torch.utils.data import default_collate

    from bench.config import compose
    from bench.datasets.pretext import pretext_dataset
    from bench.registry import create_method, get_method

    cfg = compose({"method": name, "regime": "public", "preset": "tiny", "crop_size": "48", "progress": "false"},
                  get_method(name))
    method = create_method(name, cfg)
    assert method.build_model()(torch.rand(2, 1, 48, 48, 48)).shape == (2, 2)
    dataset, _ = pretext_dataset(method, cfg, "public", 0)
    pretext = method.make_pretext("public")
    loss = pretext.step(pretext, default_collate([dataset[0], dataset[1]]))["loss"]
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in pretext.pretrained_encoder().parameters()
                                        if p.requires_grad)
