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
            "openmind_primusm"} <= transformers
    assert not {"resnet18", "r3d_18", "ctfm", "openmind_resencl", "suprem_unet", "engstler"} & transformers


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
