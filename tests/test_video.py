"""Video MAE / Video-CT MAE: the mae_st layout, position-embedding cropping, Table 2 configs."""
import json
from pathlib import Path

import torch

from bench.cli import main
from bench.config import compose
from bench.methods.video_mae import VideoMAE
from bench.registry import create_method, get_method
from tests_helpers import encoder_init


def _mae_st_checkpoint(path, embed, depth, heads, dec, dec_depth, grid=14, frames=16):
    """A checkpoint in the public mae_st key layout (separate q/k/v, pred_head.*) with known values."""
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    n = grid * grid
    state = {"patch_embed.proj.weight": r(embed, 3, 2, 16, 16), "patch_embed.proj.bias": r(embed),
             "cls_token": r(1, 1, embed), "pos_embed_spatial": r(1, n, embed),
             "pos_embed_temporal": r(1, frames // 2, embed), "pos_embed_class": r(1, 1, embed),
             "norm.weight": r(embed), "norm.bias": r(embed), "decoder_embed.weight": r(dec, embed),
             "decoder_embed.bias": r(dec), "mask_token": r(1, 1, dec),
             "decoder_pos_embed": r(1, 1 + frames // 2 * n, dec),
             f"pred_head.transforms.0.{dec_depth}.weight": r(dec), f"pred_head.transforms.0.{dec_depth}.bias": r(dec),
             "pred_head.projections.0.weight": r(768, dec), "pred_head.projections.0.bias": r(768)}

    def block(prefix, c):
        out = {}
        for name in ("norm1", "norm2"):
            out[f"{prefix}.{name}.weight"], out[f"{prefix}.{name}.bias"] = r(c), r(c)
        for name in ("q", "k", "v", "proj"):
            out[f"{prefix}.attn.{name}.weight"], out[f"{prefix}.attn.{name}.bias"] = r(c, c), r(c)
        out[f"{prefix}.mlp.fc1.weight"], out[f"{prefix}.mlp.fc1.bias"] = r(4 * c, c), r(4 * c)
        out[f"{prefix}.mlp.fc2.weight"], out[f"{prefix}.mlp.fc2.bias"] = r(c, 4 * c), r(c)
        return out

    for i in range(depth):
        state.update(block(f"blocks.{i}", embed))
    for i in range(dec_depth):
        state.update(block(f"pred_head.transforms.0.{i}", dec))
    torch.save({"model_state": state, "epoch": 100}, path)
    return state


def _check_cropped(state, encoder, pretext, side, grid=14):
    top = (grid - side) // 2
    spatial = state["pos_embed_spatial"].reshape(grid, grid, -1)[top:top + side, top:top + side]
    spatial = spatial.reshape(1, side * side, -1)
    torch.testing.assert_close(encoder["pos_embed_spatial"], spatial, rtol=0, atol=0)
    torch.testing.assert_close(encoder["pos_embed_temporal"], state["pos_embed_temporal"], rtol=0, atol=0)
    torch.testing.assert_close(encoder["pos_embed_class"], state["pos_embed_class"], rtol=0, atol=0)
    c = state["blocks.0.attn.q.weight"].shape[0]
    qkv = encoder["blocks.1.attn.qkv.weight"]
    torch.testing.assert_close(qkv[:c], state["blocks.1.attn.q.weight"], rtol=0, atol=0)
    torch.testing.assert_close(qkv[c:2 * c], state["blocks.1.attn.k.weight"], rtol=0, atol=0)
    torch.testing.assert_close(qkv[2 * c:], state["blocks.1.attn.v.weight"], rtol=0, atol=0)
    torch.testing.assert_close(encoder["blocks.1.attn.qkv.bias"][c:2 * c], state["blocks.1.attn.k.bias"], rtol=0,
                               atol=0)
    if pretext is not None:
        dec = state["decoder_pos_embed"]
        t = 8
        cropped = dec[:, 1:].reshape(t, grid, grid, -1)[:, top:top + side, top:top + side].reshape(1, t * side * side,
                                                                                                   -1)
        torch.testing.assert_close(pretext["decoder_pos_embed"][:, 1:], cropped, rtol=0, atol=0)
        torch.testing.assert_close(pretext["decoder_pos_embed"][:, :1], dec[:, :1], rtol=0, atol=0)
        torch.testing.assert_close(pretext["pred_head.projections.0.weight"], state["pred_head.projections.0.weight"])


def test_mae_st_vit_l_layout_with_pe_cropping(tmp_path):
    path = tmp_path / "mae_pretrain_vit_large_k700.pth"
    state = _mae_st_checkpoint(path, embed=1024, depth=24, heads=16, dec=512, dec_depth=4)
    assert state["decoder_pos_embed"].shape == (1, 1569, 512) and state["pos_embed_spatial"].shape == (1, 196, 1024)
    cfg = compose({"preset": "paper", "method": "video_ct_mae", "regime": "public", "weights.public": str(path)},
                  get_method("video_ct_mae"))
    method = create_method("video_ct_mae", cfg)
    model = method.build_model()
    info = encoder_init(method, cfg, model)
    assert not info["load_report"]["missing"] and not info["load_report"]["shape_mismatched"]
    assert method.finetune_encoder(model).grid == (8, 6, 6)
    # the vertebra-pretraining model (encoder + decoder) takes the same checkpoint, cropped too
    from bench.transfer import public_encoder_state

    pretext = method.build_pretext("vertebrae")
    full, _, _, _ = public_encoder_state(method, cfg, pretext)
    pretext.load_state_dict(full)
    _check_cropped(state, method.finetune_encoder(model).state_dict(), pretext.state_dict(), side=6)


def test_mae_st_layout_at_a_small_size_and_the_random_init_ablation(tmp_path):
    path = tmp_path / "small.pth"
    state = _mae_st_checkpoint(path, embed=48, depth=2, heads=2, dec=32, dec_depth=1, grid=4)  # 64-pixel video
    overrides = {"preset": "tiny", "method": "video_ct_mae", "regime": "public", "weights.public": str(path)}
    cfg = compose(overrides, get_method("video_ct_mae"))
    method = create_method("video_ct_mae", cfg)
    model = method.build_model()
    encoder_init(method, cfg, model)
    _check_cropped(state, method.finetune_encoder(model).state_dict(), None, side=2, grid=4)
    cfg = compose({**overrides, "model.pe_cropping": "false"}, get_method("video_ct_mae"))
    method = create_method("video_ct_mae", cfg)
    model = method.build_model()
    before = method.finetune_encoder(model).pos_embed_spatial.detach().clone()
    info = encoder_init(method, cfg, model)
    assert "pos_embed_spatial" in info["load_report"]["missing"]  # random init, as the ablation says
    torch.testing.assert_close(method.finetune_encoder(model).pos_embed_spatial, before)


def test_video_mae_target_is_8_of_16_frames_and_loss_on_masked_patches():
    torch.manual_seed(0)
    mae = VideoMAE(16, 32, 16, 48, 1, 2, 32, 1, 2, mask_ratio=0.8, norm_pix_loss=False)
    x = torch.rand(2, 3, 16, 32, 32)
    target = mae.target(x)
    assert target.shape == (2, 8 * 2 * 2, 768)
    # linspace(0, 15, 8).round() -> frames 0, 2, 4, 6, 9, 11, 13, 15: temporal token 3 predicts frame 6;
    # its first spatial token's first 3 values are the RGB of pixel (0, 0) (mae_st's "upqc" order)
    frame6 = (x[0, :, 6] - 0.45) / 0.225
    torch.testing.assert_close(target[0, 3 * 4 + 0, :3], frame6[:, 0, 0])
    torch.testing.assert_close(target[0, 4 * 4 + 0, :3], ((x[0, :, 9] - 0.45) / 0.225)[:, 0, 0])
    seen = []
    mae.blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    mae(x)["loss"].backward()
    assert seen[0] == 1 + round(32 * 0.2)  # cls + visible tokens only


def _video_artifacts(bench_cache):
    records = (bench_cache / "pretrain" / "video_mae").glob("*/pretrain.json")
    return {p.parent.name: json.loads(p.read_text()) for p in records}


def test_all_regimes_and_table2_ablations_run(tmp_path, bench_cache):
    before = set(_video_artifacts(bench_cache))  # the session's cache may hold other tests' video artifacts
    assert main(["run", "method=video_ct_mae", "preset=tiny", "epochs=1", f"out={tmp_path}"]) == 0
    base = ["run", "method=video_ct_mae", "regime=public_to_vertebrae", "preset=tiny", "epochs=1"]
    ablations = {
        "no_video_pretraining": ["model.video_pretraining=false"],
        "no_vertebra_pretraining": ["model.vertebra_pretraining=false"],
        "no_multi_view": ["model.multi_view=false"],
        "no_pe_cropping": ["model.pe_cropping=false"],
        "no_format_adaptation": ["model.format_adaptation=false"],
        "no_vertebra_pretraining_no_pe_cropping": ["model.vertebra_pretraining=false", "model.pe_cropping=false"],
    }
    plans = {}
    for name, switches in ablations.items():
        assert main([*base, *switches, f"out={tmp_path / name}"]) == 0
        run = tmp_path / name / "single" / "video_ct_mae-public_to_vertebrae-s0"
        metrics = json.loads((run / "metrics.json").read_text())
        plans[name] = metrics["pretraining"]["plan"]
    assert plans["no_video_pretraining"] == ["vertebrae"] and plans["no_vertebra_pretraining"] == ["public"]
    assert plans["no_multi_view"] == ["public", "vertebrae"]
    # one video artifact serves every configuration and both video methods
    assert main(["run", "method=video_mae", "regime=public", "preset=tiny", "epochs=1", f"out={tmp_path}"]) == 0
    made = [record for key, record in _video_artifacts(bench_cache).items() if key not in before]
    assert sum(r["source"] == "public" for r in made) <= 1  # none if an earlier test of the session made it
    starts = {json.loads((tmp_path / name / "single" / "video_ct_mae-public_to_vertebrae-s0" / "metrics.json")
                         .read_text())["pretraining"]["pretrain_init"]["init"]
              for name in ablations if plans[name] == ["public", "vertebrae"]}
    naive = json.loads((tmp_path / "single" / "video_mae-public-s0" / "metrics.json").read_text())["pretraining"]
    assert starts == {f"artifact {Path(naive['artifact']).name}"}  # every vertebra stage from the one video artifact
