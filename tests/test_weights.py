"""Public checkpoint layouts: each test builds a checkpoint in exactly the published key layout
with known tensors, loads it through the run path (regime public, weights.public=PATH), and checks
that every encoder tensor arrived where it belongs, by value."""
import os

import pytest
import torch
from monai.networks.nets import MaskedAutoEncoderViT, ViTAutoEnc
from monai.networks.nets.swin_unetr import SwinTransformer

from bench.errors import BenchError
from bench.weights import fetch, read_checkpoint, resize_pos_embed_3d, sha256_of
from tests_helpers import encoder_init, randomised, setup_public

_setup, _randomised = setup_public, randomised


def test_genesis_chest_ct_layout(tmp_path):
    from bench.methods.models_genesis import ENCODER_BLOCKS, UNet3D

    known = _randomised(UNet3D().state_dict())
    assert len(known) == 106 and sum(k.startswith(ENCODER_BLOCKS) for k in known) == 56
    path = tmp_path / "Genesis_Chest_CT.pt"
    torch.save({"epoch": 7, "state_dict": {f"module.{k}": v for k, v in known.items()},
                "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 1.0}]}}, path)
    method, cfg, model = _setup("models_genesis", path, **{"model.width": "1.0"})
    info = encoder_init(method, cfg, model)
    assert info["load_report"]["matched"] == 56 and not info["load_report"]["missing"]
    assert info["load_report"]["ignored_outside_encoder"] == 106 - 56  # the decoder, listed as left out
    encoder = method.finetune_encoder(model).state_dict()
    for key in (k for k in known if k.startswith(ENCODER_BLOCKS)):
        torch.testing.assert_close(encoder[key], known[key], rtol=0, atol=0)


def _swin_public(feature=48, window=7):
    swin = SwinTransformer(in_chans=1, embed_dim=feature, window_size=(window,) * 3, patch_size=(2, 2, 2),
                           depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), spatial_dims=3, use_v2=False)
    known = _randomised(swin.state_dict())
    public = {f"module.{k}".replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2."): v
              for k, v in known.items()}
    assert any(".mlp.fc1." in k for k in public) and all(k.startswith("module.") for k in public)
    return known, public


def test_model_swinvit_layout(tmp_path):
    known, public = _swin_public()
    path = tmp_path / "model_swinvit.pt"
    torch.save({"state_dict": {**public, "module.rotation_head.weight": torch.zeros(4, 768)}}, path)
    method, cfg, model = _setup("swin_unetr", path, preset="paper")
    info = encoder_init(method, cfg, model)
    report = info["load_report"]
    assert report["matched"] == len(known) and report["unexpected"] == ["rotation_head.weight"]
    encoder = method.finetune_encoder(model).state_dict()
    for key, value in known.items():
        torch.testing.assert_close(encoder[key], value, rtol=0, atol=0)


def test_swinvit_partial_match_is_an_error(tmp_path):
    _, public = _swin_public()
    path = tmp_path / "partial.pt"
    torch.save({"state_dict": {k: v for k, v in public.items() if "layers4" not in k}}, path)
    method, cfg, model = _setup("swin_unetr", path, preset="paper")
    with pytest.raises(BenchError, match=r"tensors matched by name and shape; not matched: layers4"):
        encoder_init(method, cfg, model)


def test_monai_vit_layout_across_versions(tmp_path):
    """A MONAI 1.4/1.5 ViTAutoEnc checkpoint (with cross_attn keys) at another token grid."""
    auto = ViTAutoEnc(in_channels=1, img_size=64, patch_size=16, hidden_size=48, mlp_dim=96, num_layers=2, num_heads=2)
    known = _randomised(auto.state_dict())
    old = dict(known)
    for i in range(2):
        for name in ("to_q", "to_k", "to_v", "out_proj"):
            old[f"blocks.{i}.cross_attn.{name}.weight"] = torch.randn(48, 48)
    path = tmp_path / "vit_ssl.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in old.items()}}, path)
    method, cfg, model = _setup("vit_unetr", path)  # tiny: 32^3 crops, 2x2x2 tokens
    info = encoder_init(method, cfg, model)
    assert not info["load_report"]["shape_mismatched"] and "cls_token" in info["load_report"]["missing"]
    encoder = method.finetune_encoder(model).state_dict()
    for key, value in known.items():
        if key.startswith(("conv3d_transpose",)):
            continue
        if key == "patch_embedding.position_embeddings":
            value = resize_pos_embed_3d(value, (2, 2, 2))  # 4^3 grid -> 2^3
        torch.testing.assert_close(encoder[key], value, rtol=0, atol=0)


def test_mae_layout_into_mae3d(tmp_path):
    """The MAE / timm layout: top-level 'model', fused qkv, pos_embed with a cls slot, decoder keys."""
    method, cfg, model = _setup("mae3d", tmp_path / "unused")
    pretext = method.build_pretext()
    known = _randomised(pretext.state_dict())
    flat = {k.removeprefix("encoder."): v for k, v in known.items()}  # MAE keeps encoder keys at top level
    assert "decoder_pred.weight" in flat and "blocks.0.attn.qkv.weight" in flat and "pos_embed" in flat
    path = tmp_path / "mae_pretrain.pth"
    torch.save({"model": flat, "epoch": 1}, path)
    method, cfg, model = _setup("mae3d", path)
    info = encoder_init(method, cfg, model)
    assert not info["load_report"]["missing"]
    encoder = method.finetune_encoder(model).state_dict()
    for key, value in known.items():
        if key.startswith("encoder."):
            torch.testing.assert_close(encoder[key.removeprefix("encoder.")], value, rtol=0, atol=0)


def test_monai_mae_layout_into_mae3d(tmp_path):
    mae = MaskedAutoEncoderViT(in_channels=1, img_size=32, patch_size=8, hidden_size=48, mlp_dim=192, num_layers=2,
                               num_heads=2, decoder_hidden_size=36, decoder_mlp_dim=64, decoder_num_layers=1,
                               decoder_num_heads=2)
    known = _randomised(mae.state_dict())
    path = tmp_path / "monai_mae.pt"
    torch.save({"state_dict": known}, path)
    method, cfg, model = _setup("mae3d", path)
    encoder_init(method, cfg, model)
    enc = method.finetune_encoder(model).state_dict()
    torch.testing.assert_close(enc["patch_embed.proj.weight"], known["patch_embedding.patch_embeddings.weight"])
    torch.testing.assert_close(enc["pos_embed"][:, 1:], known["patch_embedding.position_embeddings"])
    assert float(enc["pos_embed"][:, 0].abs().sum()) == 0  # MONAI has no cls slot
    torch.testing.assert_close(enc["blocks.1.attn.qkv.weight"], known["blocks.1.attn.qkv.weight"])
    torch.testing.assert_close(enc["blocks.1.attn.proj.weight"], known["blocks.1.attn.out_proj.weight"])
    torch.testing.assert_close(enc["blocks.0.mlp.fc1.weight"], known["blocks.0.mlp.linear1.weight"])
    torch.testing.assert_close(enc["norm.weight"], known["blocks.2.weight"])  # MONAI MAE: norm is blocks[depth]


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PAYLOAD_MARKER']}",))


def test_pickle_payload_is_refused_without_running(tmp_path, monkeypatch):
    marker = tmp_path / "executed"
    monkeypatch.setenv("PAYLOAD_MARKER", str(marker))
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"down_tr64.ops.0.conv1.weight": torch.zeros(1)}, "x": _Payload()}, path)
    with pytest.raises(BenchError, match="refused"):
        read_checkpoint(path)
    assert not marker.exists()


def test_numeric_numpy_state_reads_but_an_object_array_is_refused_without_running(tmp_path, monkeypatch):
    """Training checkpoints keep numpy's RNG state beside the weights (SPECTRE's, VoCo's); those numeric
    arrays read under weights_only, while an array of objects (which can carry any callable) does not."""
    import numpy as np

    weights = {"blocks.0.attn.qkv.weight": torch.ones(2, 2)}
    numeric = tmp_path / "train.pt"
    torch.save({"model": weights, "rng": np.random.get_state(), "lr": np.float64(0.5),
                "seen": np.arange(4, dtype=np.int32)}, numeric)
    loaded = read_checkpoint(numeric)
    assert torch.equal(loaded["model"]["blocks.0.attn.qkv.weight"], weights["blocks.0.attn.qkv.weight"])
    assert loaded["rng"][1].dtype == np.uint32 and list(loaded["seen"]) == [0, 1, 2, 3]

    marker = tmp_path / "executed"
    monkeypatch.setenv("PAYLOAD_MARKER", str(marker))
    objects = np.empty(1, dtype=object)
    objects[0] = _Payload()
    hostile = tmp_path / "objects.pt"
    torch.save({"model": weights, "extra": objects}, hostile)
    with pytest.raises(BenchError, match="refused"):
        read_checkpoint(hostile)
    assert not marker.exists()


def test_wrong_sha256_wrong_architecture_no_keys(tmp_path, capsys):
    from monai.networks.nets import resnet18

    from bench.cli import main

    other = tmp_path / "resnet.pt"
    torch.save({"state_dict": resnet18(spatial_dims=3, n_input_channels=1).state_dict()}, other)
    base = ["run", "method=models_genesis", "regime=public", "preset=tiny", f"out={tmp_path}/runs"]
    assert main([*base, f"weights.public={other}", "weights.sha256=" + "0" * 64]) == 2
    assert "does not match the expected" in capsys.readouterr().err
    assert main([*base, f"weights.public={other}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "none of its keys is an encoder key of models_genesis" in err[0]
    assert "the file's keys look like: conv1.weight" in err[0]  # the file's own keys, not an empty list
    empty = tmp_path / "empty.pt"
    torch.save({"epoch": 1, "note": "no tensors"}, empty)
    assert main([*base, f"weights.public={empty}"]) == 2
    assert "holds no tensor dict" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_fetch_from_url_into_cache_with_sha(tmp_path):
    """An http URL (a server on 127.0.0.1 here) is downloaded once into the cache and sha-checked."""
    import functools
    import http.server
    import threading

    src = tmp_path / "served" / "w.pt"
    src.parent.mkdir()
    torch.save({"a": torch.ones(2)}, src)
    digest = sha256_of(src)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(src.parent))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/w.pt"
    try:
        local = fetch(url, digest, tmp_path / "cache")
        assert local.read_bytes() == src.read_bytes() and tmp_path / "cache" in local.parents
        src.unlink()
        assert fetch(url, digest, tmp_path / "cache") == local  # cached: the server is not asked again
        torch.save({"a": torch.zeros(2)}, src)
        with pytest.raises(BenchError, match="does not match"):
            fetch(url, "f" * 64, tmp_path / "cache2")
        assert not any((tmp_path / "cache2").rglob("*.pt"))  # nothing half-downloaded left
    finally:
        server.shutdown()


@pytest.mark.parametrize("damage", ["one_key", "wrong_shapes"])
def test_a_partial_or_misshapen_public_load_is_one_line_not_a_silent_init(tmp_path, damage):
    """Right names but wrong shapes, or 1 of the 48 encoder tensors (56 keys less 8 BatchNorm counters):
    refused, naming what did not match."""
    from bench.methods.models_genesis import ENCODER_BLOCKS, UNet3D

    known = {k: v for k, v in _randomised(UNet3D().state_dict()).items() if k.startswith(ENCODER_BLOCKS)}
    if damage == "one_key":
        known = dict(list(known.items())[:1])
    else:
        known = {k: (torch.zeros(*v.shape[:-1], v.shape[-1] + 1) if v.dim() > 1 else v) for k, v in known.items()}
    path = tmp_path / "Genesis_Chest_CT.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in known.items()}}, path)
    method, cfg, model = _setup("models_genesis", path, **{"model.width": "1.0"})
    with pytest.raises(BenchError, match=r"of 48 encoder tensors matched by name and shape; not matched: "):
        encoder_init(method, cfg, model)


def test_a_file_url_is_read_where_it_is_never_from_a_stale_copy(tmp_path):
    """weights.public=file:///x.pt: a file fixed in place is what the next run reads."""
    from bench.weights import fetch, sha256_of

    source = tmp_path / "weights.pt"
    source.write_bytes(b"broken")
    first = fetch(source.as_uri(), "", tmp_path / "cache")
    source.write_bytes(b"fixed")
    second = fetch(source.as_uri(), "", tmp_path / "cache")
    assert first == second == source and sha256_of(second) == sha256_of(source)
    assert not (tmp_path / "cache").exists()


def test_a_text_file_and_nan_weights_are_called_what_they_are(tmp_path, capsys):
    """A text file given as a checkpoint is "not a checkpoint", not "pickled objects"; a checkpoint
    whose tensors hold NaN is named so at load, not blamed on the learning rate after a step."""
    from bench.cli import main
    from bench.methods.models_genesis import UNet3D

    base = ["run", "method=models_genesis", "regime=public", "preset=tiny", f"out={tmp_path}/runs"]
    text = tmp_path / "weights.pt"
    text.write_text("this is a README, not weights\n")
    assert main([*base, f"weights.public={text}"]) == 2
    err = capsys.readouterr().err
    assert "not a checkpoint (neither a torch.save archive nor a pickle" in err and "pickled objects" not in err
    net = UNet3D(width=0.125)
    state = {f"module.{k}": v.clone() for k, v in net.state_dict().items()}
    first = next(k for k, v in state.items() if v.is_floating_point() and "down_tr" in k)
    state[first][...] = float("nan")
    damaged = tmp_path / "nan.pt"
    torch.save({"state_dict": state}, damaged)
    assert main([*base, f"weights.public={damaged}"]) == 2
    err = capsys.readouterr().err
    assert "hold NaN or Inf" in err and "lower lr" not in err
    assert not (tmp_path / "runs").exists()


def test_right_names_of_the_wrong_shape_are_reported_as_shapes(tmp_path):
    """Every name matches and no shape does (another model size): the line lists the shapes, it does
    not say that no key matched."""
    from torch import nn

    from bench.weights import load_into

    target = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    other = nn.Sequential(nn.Linear(6, 16), nn.Linear(16, 3)).state_dict()
    with pytest.raises(BenchError) as err:
        load_into(target, other, "big.pt")
    assert "0 of 4 encoder tensors matched by name and shape" in str(err.value)
    assert "0.weight: checkpoint (16, 6) vs model (8, 4)" in str(err.value)
