"""The transformer finetuning recipe: layer-wise lr decay over a method's layer groups, the LP-FT
head (the linear probe folded into the classifier), label smoothing, and the class-balanced kNN."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.errors import BenchError
from bench.evaluation import split_parts, targets
from bench.finetune import FinetuneStage
from bench.loop import Execution
from bench.probes import features, fit_linear, init_head_from_probe, knn_probs
from bench.registry import create_method
from bench.run import prepare, resolve_runs


def _cfg(method, **extra):
    return resolve_runs({"method": method, "regime": "scratch", "preset": "tiny", **extra})[0]


def _stage(cfg):
    method, data, model, _ = prepare(cfg)
    train, val, _ = split_parts(data, cfg)
    return method, data, model, FinetuneStage(method, cfg, model, train, val, Execution.of(cfg, method))


def test_layer_decay_scales_lr_by_depth_from_the_head(bench_cache):
    cfg = _cfg("vit_b", layer_decay="0.5")
    _, _, model, stage = _stage(cfg)
    depth = cfg.model.depth
    scale = {id(p): g["lr_scale"] for g in stage.param_groups() for p in g["params"]}
    assert scale[id(model.head.weight)] == 1.0
    assert scale[id(model.encoder.norm.weight)] == 1.0  # the final norm trains with the head
    for i, block in enumerate(model.encoder.blocks):
        assert scale[id(block.attn.qkv.weight)] == pytest.approx(0.5 ** (depth - i))
    assert scale[id(model.encoder.pos_embed)] == pytest.approx(0.5 ** (depth + 1))
    assert len(scale) == sum(1 for p in model.parameters() if p.requires_grad)
    no_decay = {id(p) for g in stage.param_groups() if g["weight_decay"] == 0 for p in g["params"]}
    assert id(model.head.bias) in no_decay and id(model.head.weight) not in no_decay


def test_layer_decay_without_layer_groups_is_one_line(bench_cache):
    cfg = _cfg("resnet18", layer_decay="0.75")
    with pytest.raises(BenchError, match="layer_decay.*resnet18.*declares no layer order"):
        _stage(cfg)[3].param_groups()


@pytest.mark.parametrize("method", ["vit_b", "video_mae"])
def test_probe_head_predicts_what_the_linear_probe_predicts(bench_cache, method):
    """LP-FT: before any training step, the classifier (eval mode) gives the probe's probabilities."""
    cfg = _cfg(method, head_init="linear_probe")
    method_obj, data, model, _ = prepare(cfg)
    info = init_head_from_probe(method_obj, data, cfg, model)
    train, val, test = split_parts(data, cfg)
    x, _, _, _ = features(method_obj, cfg, model, data, {"train": train, "val": val, "test": test})
    scaler, clf, _ = fit_linear(cfg, x, {"train": targets(train, cfg), "val": targets(val, cfg)})
    expected = clf.predict_proba(scaler.transform(x["val"]))
    model.eval()
    with torch.no_grad():
        got = torch.softmax(model.head(torch.from_numpy(x["val"])).double(), 1).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert info["C"] in list(cfg.probe.c_grid)
    assert isinstance(model.head[0], torch.nn.BatchNorm1d) and not model.head[0].affine


def test_probe_head_needs_a_linear_head(bench_cache):
    cfg = _cfg("models_genesis", head_init="linear_probe")
    method, data, model, _ = prepare(cfg)
    with pytest.raises(BenchError, match="head_init.*models_genesis.*not one linear layer"):
        init_head_from_probe(method, data, cfg, model)


def test_label_smoothing_reaches_the_loss(bench_cache):
    assert _stage(_cfg("vit_b", label_smoothing="0.1"))[3].loss_fn.label_smoothing == 0.1


@pytest.mark.parametrize("key,value", [("layer_decay", "0"), ("layer_decay", "1.5"), ("label_smoothing", "1")])
def test_recipe_keys_are_range_checked(key, value):
    with pytest.raises(BenchError, match=f"bad value for '{key}'"):
        _cfg("vit_b", **{key: value})


def test_balanced_knn_divides_votes_by_class_share():
    bank = np.array([[1.0, 0.3], [1.0, -0.3], [1.0, 0.35], [1.0, 0.01]], np.float32)
    labels = np.array([0, 0, 0, 1])
    query = np.array([[1.0, 0.0]], np.float32)
    plain = knn_probs(bank, labels, query, 2, k=4, temperature=0.5)
    balanced = knn_probs(bank, labels, query, 2, k=4, temperature=0.5, balanced=True)
    votes = plain[0] / np.array([0.75, 0.25])
    np.testing.assert_allclose(balanced[0], votes / votes.sum())
    assert plain[0, 1] < 0.5 < balanced[0, 1]  # the rare class wins once its prior is divided out


def test_small_preset_gives_transformers_the_recipe():
    for name in ("vit_b", "vit_l", "mae3d", "vit_unetr", "swin_unetr", "video_mae", "video_ct_mae"):
        cfg = resolve_runs({"method": name, "regime": "scratch"})[0]
        assert (cfg.head_init, cfg.layer_decay, cfg.label_smoothing) == ("linear_probe", 0.75, 0.1), name
        assert create_method(name, cfg).layer_groups() is not None
    assert resolve_runs({"method": "resnet18", "regime": "scratch"})[0].head_init == "random"
