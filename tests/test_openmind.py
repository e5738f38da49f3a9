"""OpenMind / nnssl: checkpoints in the published container (network_weights + adaptation plan) load
every encoder tensor by value; the plan, not a guessed prefix, says where the encoder is; a
checkpoint of the other family is one line; the MAE pretexts run through the CLI at tiny."""
import json

import pytest
import torch
from dynamic_network_architectures.architectures.primus import Primus
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

from bench.config import compose
from bench.errors import BenchError
from bench.methods.openmind import block_mask, resenc_kwargs
from bench.registry import create_method, get_method
from tests_helpers import encoder_init, run_cli, setup_public


def randomised_in_place(net: torch.nn.Module) -> dict:
    """The network's state with seeded random values. Written into the module, so keys that alias
    one tensor (ResEnc's stem conv is both `convs.0.conv` and `convs.0.all_modules.0`) stay equal,
    as in a real checkpoint."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in net.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=g))
    return {k: v.clone() for k, v in net.state_dict().items()}


def _plan(arch: str, encoder: str, stem: str, lpe: str | None = None) -> dict:
    """An adaptation plan as AdaptationPlan.serialize() writes it (plain data only)."""
    return {"architecture_plans": {"arch_class_name": arch, "arch_kwargs": None, "arch_kwargs_requiring_import": None},
            "pretrain_plan": {"dataset_name": "Dataset745_OpenMind", "plans_name": "nnsslPlans",
                              "configurations": {"onemmiso": {"spacing": [1, 1, 1],
                                                              "normalization_schemes": ["ZScoreNormalization"]}}},
            "pretrain_num_input_channels": 1, "recommended_downstream_patchsize": [160, 160, 160],
            "key_to_encoder": encoder, "key_to_stem": stem, "keys_to_in_proj": [f"{stem}.proj"], "key_to_lpe": lpe}


def _container(weights: dict, plan: dict, trainer: str) -> dict:
    """What nnssl's AbstractTrainer.save_checkpoint writes."""
    return {"network_weights": weights, "optimizer_state": {"state": {}, "param_groups": []},
            "grad_scaler_state": None, "logging": {"train_losses": [0.5]}, "_best_ema": None, "current_epoch": 1000,
            "init_args": {"plan": "...", "configuration_name": "onemmiso", "fold": 0}, "trainer_name": trainer,
            "nnssl_adaptation_plan": plan}


def _resencl_checkpoint(path, p_kwargs=None, arch="ResEncL"):
    from bench.methods.openmind import ResEncParams

    kwargs = resenc_kwargs(ResEncParams(**(p_kwargs or {})))
    unet = ResidualEncoderUNet(**kwargs, num_classes=1, n_conv_per_stage_decoder=[1] * (kwargs["n_stages"] - 1))
    known = randomised_in_place(unet)
    torch.save(_container(known, _plan(arch, "encoder.stages", "encoder.stem"), "BaseMAETrainer"), path)
    return {k[len("encoder."):]: v for k, v in known.items() if k.startswith("encoder.")}


def test_resencl_checkpoint_loads_every_encoder_tensor_at_the_paper_architecture(tmp_path):
    path = tmp_path / "checkpoint_final.pth"
    encoder = _resencl_checkpoint(path)
    method, cfg, model = setup_public("openmind_resencl", path, preset="paper")
    report = encoder_init(method, cfg, model)["load_report"]
    loaded = method.finetune_encoder(model).state_dict()
    assert report["matched"] == len(encoder) == len(loaded) and not report["missing"]
    for key, value in encoder.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)


def _primusm_checkpoint(path):
    """A Primus-M file as nnssl's BaseEvaMAETrainer writes it: its EvaMAE's encoder (dynamic-network-
    architectures' Eva with layer scale 0.1 and the inner attention norm, pretrained at 160^3: 20^3
    tokens) and its 2-block Eva decoder with the same options, in the nnssl container."""
    from dynamic_network_architectures.building_blocks.eva import Eva

    primus = Primus(1, 864, (8, 8, 8), 1, eva_depth=16, eva_numheads=12, input_shape=(160, 160, 160),
                    init_values=0.1, scale_attn_inner=True)
    decoder = Eva(embed_dim=864, depth=2, num_heads=12, ref_feat_shape=(20, 20, 20), use_rot_pos_emb=True,
                  use_abs_pos_emb=True, mlp_ratio=4 * 2 / 3, init_values=0.1, scale_attn_inner=True)
    known = randomised_in_place(primus)
    weights = {**known, **{f"decoder.{k}": v for k, v in decoder.state_dict().items()},
               "mask_token": torch.zeros(1, 1, 864)}
    torch.save(_container(weights, _plan("PrimusM", "eva", "down_projection", "eva.pos_embed"), "BaseEvaMAETrainer"),
               path)
    return known


def test_primusm_checkpoint_loads_with_the_plans_position_embedding_interpolated(tmp_path):
    """An OpenMind Primus-M file (pretrained at 160^3, 20^3 tokens) into the paper's 96^3 crops: every
    encoder tensor, layer scale and inner attention norms included; the decoder listed as ignored."""
    path = tmp_path / "checkpoint_final.pth"
    known = _primusm_checkpoint(path)
    method, cfg, model = setup_public("openmind_primusm", path, preset="paper")
    report = encoder_init(method, cfg, model)["load_report"]
    loaded = method.finetune_encoder(model).state_dict()
    assert report["matched"] == len(loaded) and not report["missing"]
    assert any(k.endswith("gamma_1") for k in loaded) and any(".attn.norm." in k for k in loaded)
    assert report["ignored_outside_encoder"] == 0  # the plan hands over the encoder alone
    for key, value in known.items():
        if key.startswith(("eva.", "down_projection.")) and key != "eva.pos_embed":
            torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)
    assert loaded["eva.pos_embed"].shape == (1, 12**3, 864)
    grid = known["eva.pos_embed"].reshape(1, 20, 20, 20, 864).permute(0, 4, 1, 2, 3)
    expected = torch.nn.functional.interpolate(grid, size=(12, 12, 12), mode="trilinear", align_corners=False)
    torch.testing.assert_close(loaded["eva.pos_embed"], expected.permute(0, 2, 3, 4, 1).reshape(1, -1, 864))


def test_primusm_file_into_an_encoder_without_layer_scale_is_one_line_naming_them(tmp_path):
    path = tmp_path / "checkpoint_final.pth"
    _primusm_checkpoint(path)
    method, cfg, model = setup_public("openmind_primusm", path, preset="paper",
                                      **{"model.init_values": "0", "model.scale_attn_inner": "false"})
    with pytest.raises(BenchError) as err:
        encoder_init(method, cfg, model)
    line = str(err.value)
    assert "\n" not in line and "64 tensors of the file's encoder are not in the encoder built here" in line
    assert "eva.blocks.0.gamma_1" in line


def test_bench_weights_check_prints_the_load_report_of_a_published_layout(tmp_path):
    path = tmp_path / "checkpoint_final.pth"
    _primusm_checkpoint(path)
    done = run_cli("weights", "check", str(path), "method=openmind_primusm")
    assert done.returncode == 0, done.stderr
    assert "openmind_primusm (paper): 373 of 373 encoder tensors loaded from" in done.stdout
    listed = run_cli("weights", "list")
    assert listed.returncode == 0 and '"method": "openmind_primusm"' in listed.stdout
    bad = run_cli("weights", "check", str(path), "method=openmind_primusm", "model.init_values=0",
                  "model.scale_attn_inner=false")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "eva.blocks.0.gamma_1" in bad.stderr


def test_primusm_pretext_is_nnssls_evamae():
    """The pretext's Eva decoder has nnssl's 2 blocks with the encoder's options at the paper preset."""
    cfg = compose({"method": "openmind_primusm", "regime": "public_to_vertebrae", "preset": "paper"},
                  get_method("openmind_primusm"))
    pretext = create_method("openmind_primusm", cfg).build_pretext()
    keys = pretext.state_dict()
    assert len(pretext.decoder.blocks) == 2 and "decoder.blocks.1.gamma_2" in keys
    assert "decoder.blocks.0.attn.norm.weight" in keys and "encoder.eva.blocks.15.gamma_1" in keys


def test_the_plan_says_where_the_encoder_is(tmp_path):
    """A plan naming other prefixes is followed: the same tensors under `net.enc.*` still load."""
    path = tmp_path / "renamed.pth"
    encoder = _resencl_checkpoint(path, {"features_per_stage": [4, 8, 16], "n_blocks_per_stage": [1, 1, 1],
                                         "first_stride": 2})  # the tiny preset's network
    ckpt = torch.load(path, weights_only=True)
    ckpt["network_weights"] = {k.replace("encoder.stages", "net.enc").replace("encoder.stem", "net.stem0"): v
                               for k, v in ckpt["network_weights"].items()}
    ckpt["nnssl_adaptation_plan"].update(key_to_encoder="net.enc", key_to_stem="net.stem0")
    torch.save(ckpt, path)
    method, cfg, model = setup_public("openmind_resencl", path)
    encoder_init(method, cfg, model)
    loaded = method.finetune_encoder(model).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in encoder.items())


def test_wrong_family_and_plainer_files_are_one_line(tmp_path):
    primus_file = tmp_path / "primus.pth"
    primus = Primus(1, 48, (8, 8, 8), 1, eva_depth=2, eva_numheads=2, input_shape=(32, 32, 32))
    torch.save(_container(primus.state_dict(), _plan("PrimusM", "eva", "down_projection", "eva.pos_embed"), "x"),
               primus_file)
    method, cfg, model = setup_public("openmind_resencl", primus_file)
    with pytest.raises(BenchError, match="names architecture 'PrimusM'; 'openmind_resencl' loads ResEnc"):
        encoder_init(method, cfg, model)
    garbled = tmp_path / "garbled.pth"
    torch.save(_container(primus.state_dict(), "not a plan", "x"), garbled)
    method, cfg, model = setup_public("openmind_primusm", garbled)
    with pytest.raises(BenchError, match="nnssl_adaptation_plan is not readable"):
        encoder_init(method, cfg, model)
    bare = tmp_path / "bare.pth"
    torch.save({"state_dict": primus.state_dict()}, bare)
    method, cfg, model = setup_public("openmind_primusm", bare)
    with pytest.raises(BenchError, match="not an nnssl checkpoint"):
        encoder_init(method, cfg, model)
    # through the CLI: one line, exit 2, nothing written
    out = run_cli("run", "method=openmind_primusm", "regime=public", "preset=tiny",
                  f"weights.public={tmp_path}/bare.pth", f"out={tmp_path}/runs")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "not an nnssl checkpoint" in out.stderr and not (tmp_path / "runs").exists()


def test_block_mask_hides_the_ratio_in_whole_blocks():
    torch.manual_seed(0)
    keep = block_mask(torch.Size([3, 1, 32, 32, 32]), 8, 0.75, torch.device("cpu"))
    assert keep.shape == (3, 1, 32, 32, 32)
    blocks = keep[:, 0].unfold(1, 8, 8).unfold(2, 8, 8).unfold(3, 8, 8).reshape(3, 64, -1)
    assert torch.all(blocks.amin(-1) == blocks.amax(-1))  # constant inside each block
    assert torch.all((1 - blocks[..., 0]).sum(1) == 48)  # 75 % of 64 blocks, exactly, in every sample


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["openmind_resencl", "openmind_primusm"])
def test_mae_pretext_then_finetuning_through_the_cli(tmp_path, name):
    """public_to_vertebrae at tiny: the embedded public stand-in (MAE on the body-CT corpus), MAE on
    the vertebrae, then finetuning from that encoder."""
    out = run_cli("run", f"method={name}", "regime=public_to_vertebrae", "preset=tiny", "epochs=1",
                  "pretrain.epochs=1", f"out={tmp_path}/runs")
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "runs" / "single").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    pretraining = metrics["pretraining"]
    assert pretraining["plan"] == ["public", "vertebrae"] and pretraining["init"].startswith("artifact")
    assert pretraining["pretrain_init"]["init"].startswith("artifact")  # the vertebrae stage began from public
    assert all(e["loss"] > 0 for e in pretraining["pretrain_curve"]) and not pretraining["load_report"]["missing"]


@pytest.mark.parametrize("name", ["openmind_resencl", "openmind_primusm"])
def test_mae_reconstruction_keeps_the_visible_voxels_and_fills_the_hidden_ones(name):
    """What `bench explain` shows of the OpenMind pretexts: the input where it was visible, the
    network's restoration (back in the input's intensities) where it was hidden, at the input's size."""
    cfg = compose({"preset": "tiny", "method": name, "regime": "public_to_vertebrae"}, get_method(name))
    method = create_method(name, cfg)
    pretext = method.make_pretext("vertebrae").eval()
    x = torch.rand(2, 1, cfg.crop_size, cfg.crop_size, cfg.crop_size) * 0.5 + 0.25
    torch.manual_seed(0)
    with torch.no_grad():
        masked, recon = pretext.reconstruction(x)
    assert masked.shape == recon.shape == x.shape
    hidden = masked == 0
    assert 0.6 < hidden.float().mean() < 0.9  # the pretext's 75 % mask (whole blocks or patches)
    assert torch.equal(recon[~hidden], x[~hidden])
    assert torch.isfinite(recon).all() and not torch.equal(recon[hidden], x[hidden])


@pytest.mark.parametrize("patch", [12, 6])
def test_primus_patch_size_that_its_decoder_cannot_restore_is_one_line(patch):
    """Primus' patch decoder upsamples by two per stage: any other patch size is refused before a
    network is built (it failed with a shape error inside the pretext's loss)."""
    cfg = compose({"preset": "tiny", "method": "openmind_primusm", "crop_size": "48",
                   "model.patch_size": str(patch)}, get_method("openmind_primusm"))
    with pytest.raises(BenchError, match=f"model.patch_size must be a power of two \\(got {patch}\\)"):
        create_method("openmind_primusm", cfg).build_encoder()
