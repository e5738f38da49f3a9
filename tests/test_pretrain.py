"""The pretraining stage: artifacts made once and shared, loss curves recorded, pretext specifics."""
import json
from pathlib import Path

import pytest
import torch

from bench.cli import main
from bench.config import compose
from bench.errors import BenchError
from bench.registry import create_method, get_method


def test_each_artifact_is_computed_once(tmp_path, bench_cache):
    # vit_unetr: public (out-of-domain corpus) -> public_to_vertebrae (unlabelled vertebrae, from it)
    assert main(["run", "method=vit_unetr", "preset=tiny", "epochs=1", f"out={tmp_path}"]) == 0
    folders = sorted((bench_cache / "pretrain" / "vit_unetr").glob("[!.]*[!k]"))
    assert len(folders) == 2  # public, and vertebrae-from-public: shared by the three regimes
    stamps = {f: (f / "pretext.safetensors").stat().st_mtime_ns for f in folders}
    assert main(["run", "method=vit_unetr", "preset=tiny", "epochs=1", "seed=1", f"out={tmp_path}"]) == 0
    assert {f: (f / "pretext.safetensors").stat().st_mtime_ns for f in folders} == stamps  # reused
    records = [json.loads((f / "pretrain.json").read_text()) for f in folders]
    by_source = {r["source"]: r for r in records}
    assert by_source["public"]["init"] == {"init": "random"}
    assert by_source["vertebrae"]["init"]["init"].startswith("artifact ")
    assert by_source["public"]["spec"]["data"]["corpus"] == "body_ct"
    metrics = json.loads((tmp_path / "single" / "vit_unetr-public_to_vertebrae-s1" / "metrics.json").read_text())
    curve = metrics["pretraining"]["pretrain_curve"]
    assert len(curve) == 2 and {"loss", "l1", "contrastive"} <= set(curve[0])  # the tiny preset's 2 epochs
    assert metrics["pretraining"]["load_report"]["matched"] > 0


def test_compile_switch_compiles_the_pretext_too(tmp_path, bench_cache, monkeypatch):
    """compile=true runs the pretraining step through torch.compile (recorded here; the real
    inductor path on CPU is the finetuning compile test's), and makes a separate artifact."""
    from bench.methods.mae3d import MAE3D

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module, **kw: compiled.append(type(module)) or module)
    args = ["run", "method=mae3d", "regime=vertebrae", "preset=tiny", "epochs=1", f"out={tmp_path}"]
    assert main(args + ["compile=true"]) == 0
    assert MAE3D in compiled
    assert main(args + ["seed=1"]) == 0  # eager: another artifact
    used = []
    for seed in (0, 1):
        metrics = json.loads((tmp_path / "single" / f"mae3d-vertebrae-s{seed}" / "metrics.json").read_text())
        folder = Path(metrics["pretraining"]["artifact"])
        used.append((folder, json.loads((folder / "pretrain.json").read_text())["spec"]["compile"]))
    assert used[0][0] != used[1][0] and [c for _, c in used] == [True, False]


def test_mae_encoder_sees_only_visible_tokens():
    cfg = compose({"preset": "tiny", "method": "mae3d"}, get_method("mae3d"))
    pretext = create_method("mae3d", cfg).build_pretext()
    seen = []
    pretext.encoder.blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    out = pretext(torch.rand(2, 1, 32, 32, 32))
    n = pretext.encoder.num_patches  # 4^3 = 64 with 8^3 patches
    assert seen[0] == (2, 1 + round(n * 0.25), 48)  # cls + the 25 % visible patches
    out["loss"].backward()
    assert pretext.decoder_pred.weight.grad is not None


@pytest.mark.parametrize("norm_pix", [False, True])
def test_mae_loss_is_maes_masked_patch_loss(norm_pix):
    """Predicting the hidden patches alone gives MAE's loss: every patch predicted, the per-patch
    MSE averaged over the hidden ones (targets normalised with the unbiased variance)."""
    cfg = compose({"preset": "tiny", "method": "mae3d", "model.norm_pix_loss": str(norm_pix).lower()},
                  get_method("mae3d"))
    pretext = create_method("mae3d", cfg).build_pretext()
    from bench.methods import mae3d

    x = torch.rand(2, 1, 32, 32, 32)
    torch.manual_seed(0)
    mask = mae3d.random_masking(2, 64, 0.75, x.device).mask
    torch.manual_seed(0)
    decoded = []
    pretext.decoder_blocks[-1].register_forward_hook(lambda module, args, out: decoded.append(out))
    loss = pretext(x)["loss"]
    pred = pretext.decoder_pred(pretext.decoder_norm(decoded[0]))[:, 1:]  # all 64 patches
    target = mae3d.patchify(x, 8)
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(-1)
    torch.testing.assert_close(loss, (per_patch * mask).sum() / mask.sum())
    assert mask.sum(1).tolist() == [48, 48]


def test_video_mae_loss_is_maes_masked_patch_loss():
    from bench.methods import mae3d
    from bench.methods.video_mae import VideoMAE

    torch.manual_seed(0)
    model = VideoMAE(16, 32, 16, embed_dim=48, depth=1, heads=2, decoder_dim=32, decoder_depth=1,
                     decoder_heads=2, mask_ratio=0.75, norm_pix_loss=True)
    x = torch.rand(2, 3, 16, 32, 32)
    torch.manual_seed(1)
    mask = mae3d.random_masking(2, model.num_patches, 0.75, x.device).mask
    torch.manual_seed(1)
    decoded = []
    model.pred_head.transforms[0].register_forward_hook(lambda module, args, out: decoded.append(out))
    loss = model(x)["loss"]
    pred = model.pred_head.projections[0](decoded[0])[:, 1:]
    target = model.target(x)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(-1)
    torch.testing.assert_close(loss, (per_patch * mask).sum() / mask.sum())


def test_genesis_transforms_restore_target():
    from bench.methods.models_genesis import genesis_transform

    torch.manual_seed(0)
    x = torch.rand(1, 16, 16, 16)
    changed = 0
    for _ in range(20):
        inp, target = genesis_transform(x)
        assert inp.shape == target.shape == x.shape and 0 <= float(inp.min()) and float(inp.max()) <= 1
        # the target is the original up to flips: same voxels, same sum
        torch.testing.assert_close(target.sum(), x.sum())
        changed += not torch.equal(inp, target)
    assert changed >= 15  # p(no transform) = 0.5 x 0.1 x 0.1 = 0.005


def test_genesis_pretext_restores_random_cubes_of_pretext_size():
    from bench.methods.models_genesis import random_cube

    torch.manual_seed(0)
    x = torch.arange(24 ** 3, dtype=torch.float32).view(1, 24, 24, 24)
    cube = random_cube(x, 16)
    assert cube.shape == (1, 16, 16, 16)
    z, y, w = (int(v) for v in torch.nonzero(x[0] == cube[0, 0, 0, 0])[0])  # a contiguous block of x
    torch.testing.assert_close(cube, x[:, z:z + 16, y:y + 16, w:w + 16])
    assert random_cube(x, 0) is x
    cfg = compose({"method": "models_genesis", "preset": "tiny", "model.pretext_size": "12"},
                  get_method("models_genesis"))
    with pytest.raises(BenchError, match="model.pretext_size=12"):
        create_method("models_genesis", cfg).build_pretext()
    cfg = compose({"method": "models_genesis", "preset": "tiny", "model.pretext_size": "16"},
                  get_method("models_genesis"))
    pretext = create_method("models_genesis", cfg).build_pretext()
    seen = []
    pretext.unet.register_forward_hook(lambda module, args, out: seen.append((args[0].shape, out.shape)))
    assert pretext(torch.rand(2, 1, 32, 32, 32))["loss"].ndim == 0
    assert seen == [((2, 1, 16, 16, 16), (2, 1, 16, 16, 16))]


def test_mae_encoder_embeds_the_visible_patches_alone_as_the_conv_would():
    from bench.methods.vit import ViT3D, patchify

    torch.manual_seed(0)
    vit = ViT3D(16, 4, embed_dim=24, depth=1, num_heads=2)
    x = torch.rand(2, 1, 16, 16, 16)
    conv = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)  # the published layout's strided conv
    torch.testing.assert_close(vit.patch_embed(x), conv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vit.patch_embed.embed_patches(patchify(x, 4)), conv, rtol=1e-5, atol=1e-5)
    keep = torch.stack([torch.randperm(64)[:13] for _ in range(2)])
    seen = []
    vit.blocks[0].register_forward_hook(lambda module, args, out: seen.append(args[0]))
    vit.forward_tokens(x, keep)
    full = vit.patch_embed.proj(x).flatten(2).transpose(1, 2) + vit.pos_embed[:, 1:]  # the conv itself
    expected = torch.gather(full, 1, keep.unsqueeze(-1).expand(-1, -1, 24))
    assert seen[0].shape == (2, 14, 24)  # cls + the 13 kept patches
    torch.testing.assert_close(seen[0][:, 1:], expected, rtol=1e-5, atol=1e-5)


def test_an_interrupted_pretraining_resumes_from_its_last_epoch(tmp_path, monkeypatch):
    """Killed during epoch 2 of 3, the stage restarts at epoch 2 and ends with the same model."""
    from safetensors.torch import load_file

    import bench.pretrain as pretrain

    overrides = {"method": "mae3d", "regime": "vertebrae", "preset": "tiny", "pretrain.epochs": "3"}

    def build(cache):
        cfg = compose({**overrides, "cache_dir": str(cache)}, get_method("mae3d"))
        return pretrain.ensure_artifact(create_method("mae3d", cfg), cfg, "vertebrae", None)

    whole = build(tmp_path / "whole")
    original = pretrain.PretextStage.set_epoch

    def interrupt_at_2(self, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        original(self, epoch)

    monkeypatch.setattr(pretrain.PretextStage, "set_epoch", interrupt_at_2)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "cut")
    staging = next((tmp_path / "cut" / "pretrain" / "mae3d").glob(".*.staging"))
    assert (staging / pretrain.STATE_FILE).is_file()
    monkeypatch.setattr(pretrain.PretextStage, "set_epoch", original)
    resumed = build(tmp_path / "cut")
    record = json.loads((resumed / "pretrain.json").read_text())
    assert record["resumed_at_epoch"] == 2 and len(record["curve"]) == 3 and not staging.exists()
    a, b = load_file(str(whole / "pretext.safetensors")), load_file(str(resumed / "pretext.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    whole_curve = json.loads((whole / "pretrain.json").read_text())["curve"]
    assert [e["loss"] for e in record["curve"]] == [e["loss"] for e in whole_curve]


def test_an_edit_to_a_plugins_code_makes_a_new_artifact_identity(tmp_path, monkeypatch):
    """The artifact's hash covers the source of the method's class and its bases (the file of its
    pretext with it), so a changed pretext schedule is not served the artifact the old code made."""
    import importlib
    import sys

    from bench.pretrain import code_digest

    source = ("from bench.methods.mae3d import MAE3D, MAE3DMethod\n\nclass EditedMAE(MAE3D):\n"
              "    def on_epoch(self, epoch, epochs):\n        return {}\n\n\nclass Edited(MAE3DMethod):\n"
              "    pass\n")
    (tmp_path / "edited_plugin.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    original = importlib.import_module("edited_plugin").Edited
    first = code_digest(original.__new__(original))
    (tmp_path / "edited_plugin.py").write_text(source.replace("return {}", "return {'momentum': 0.99}"))
    sys.modules.pop("edited_plugin")
    edited = importlib.import_module("edited_plugin").Edited
    assert code_digest(edited.__new__(edited)) != first
