import pytest
from omegaconf import OmegaConf

from bench.config import compose, config_hash, parse_overrides
from bench.errors import BenchError
from bench.registry import get_method


def test_presets_layer_in_order():
    cls = get_method("resnet18")
    tiny = compose({"preset": "tiny"}, cls)
    assert tiny.crop_size == 32 and tiny.model.widen_factor == 0.25  # preset file, then method preset
    user = compose({"preset": "tiny", "model.widen_factor": "0.5", "lr": "0.01"}, cls)
    assert user.model.widen_factor == 0.5 and user.lr == 0.01  # the command line wins
    paper = compose({"preset": "paper"}, cls)
    assert paper.crop_size == 96 and paper.model.widen_factor == 1.0 and paper.amp is True


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"lr": "abc"}, "bad value for 'lr'"),
        ({"lrr": "1"}, "did you mean 'lr'"),
        ({"optimizer": "rmsprop"}, "'adamw', 'adam', 'sgd'"),
        ({"model.widen": "2"}, "did you mean 'model.widen_factor'"),
        ({"preset": "huge"}, "unknown preset 'huge'"),
        ({"epochs": "0"}, "'epochs': 0; expected > 0"),
        ({"synthetic.fracture_rate": "1.5"}, "expected in (0, 1)"),
        ({"synthetic.max_vertebrae": "1"}, "synthetic.max_vertebrae"),
    ],
)
def test_bad_config_is_one_clear_line(overrides, expected):
    with pytest.raises(BenchError) as err:
        compose(overrides, get_method("resnet18"))
    message = str(err.value)
    assert expected in message and "\n" not in message


def test_parse_overrides_rejects_non_key_value():
    with pytest.raises(BenchError, match="expected key=value"):
        parse_overrides(["seed"])
    with pytest.raises(BenchError, match="given twice"):
        parse_overrides(["seed=1", "seed=2"])
    assert parse_overrides(["a.b=1", "c=x=y"]) == {"a.b": "1", "c": "x=y"}


def test_config_hash_is_stable_and_sensitive():
    a = OmegaConf.create({"x": 1, "y": {"z": [1, 2]}})
    b = OmegaConf.create({"y": {"z": [1, 2]}, "x": 1})
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(OmegaConf.create({"x": 2, "y": {"z": [1, 2]}}))


@pytest.mark.parametrize("value", ["x/../../../victim", "..", "a/b", "../x"])
def test_variant_cannot_leave_the_results_folder(value):
    from bench.errors import BenchError
    from bench.run import resolve_runs

    with pytest.raises(BenchError, match="bad value for 'variant'"):
        resolve_runs({"method": "resnet18", "regime": "scratch", "preset": "tiny", "variant": value})
