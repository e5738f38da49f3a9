"""SuPreM: both published containers (supervised `net` with `module.backbone.`, self-supervised `model`
with `encoder.` and the doubled stage index) load every encoder tensor by value; the input window is
SuPreM's; a file of the other backbone is one line."""
import pytest
import torch
from monai.networks.nets import SwinUNETR

from bench.errors import BenchError
from bench.methods.inputs import HUWindow
from bench.methods.models_genesis import UNet3D
from tests_helpers import assert_encoder_loaded, encoder_init, randomised, run_cli, setup_public


def _swin_state():
    net = SwinUNETR(in_channels=1, out_channels=32, feature_size=48)
    known = randomised(net.state_dict())
    encoder = {k[len("swinViT."):]: v for k, v in known.items() if k.startswith("swinViT.")}
    return known, encoder


def test_supervised_swinunetr_file_loads_every_encoder_tensor(tmp_path):
    known, encoder = _swin_state()
    universal = {f"module.backbone.{k}": v for k, v in known.items()}
    universal.update({"module.organ_embedding": torch.randn(32, 512), "module.controller.weight": torch.randn(8, 8),
                      "module.text_to_vision.weight": torch.randn(256, 512)})  # the text/controller branches
    path = tmp_path / "supervised_suprem_swinunetr_2100.pth"
    torch.save({"net": universal, "optimizer": {"state": {}, "param_groups": []}, "scheduler": {"last_epoch": 2100},
                "epoch": 2100}, path)
    method, cfg, model = setup_public("suprem", path, preset="paper")
    report = encoder_init(method, cfg, model)["load_report"]
    assert report["matched"] == len(encoder) and not report["missing"]
    assert_encoder_loaded(method, model, encoder)


def test_self_supervised_swin_file_with_the_doubled_stage_index_loads(tmp_path):
    known, encoder = _swin_state()
    ssl = {}
    for key, value in encoder.items():
        stage, rest = key.split(".", 1)
        ssl["encoder." + (f"{stage}.0.{rest}" if stage.startswith("layers") else key)] = value  # layers1.0.0.blocks
    ssl.update({"encoder.mask_token": torch.zeros(1, 1, 48), "encoder.norm.weight": torch.ones(768),
                "encoder.norm.bias": torch.zeros(768), "out.conv.conv.weight": torch.randn(1, 48, 1, 1, 1)})
    path = tmp_path / "self_supervised_nv_swin_unetr_50000.pth"
    torch.save({"model": ssl}, path)
    method, cfg, model = setup_public("suprem", path, preset="paper")
    encoder_init(method, cfg, model)
    assert_encoder_loaded(method, model, encoder)


def test_supervised_unet_file_loads_and_a_swin_file_into_the_unet_is_one_line(tmp_path):
    known = randomised(UNet3D().state_dict())
    path = tmp_path / "supervised_suprem_unet_2100.pth"
    torch.save({"net": {f"module.backbone.{k}": v for k, v in known.items()}, "epoch": 2100}, path)
    method, cfg, model = setup_public("suprem_unet", path, preset="paper")
    encoder_init(method, cfg, model)
    encoder = {k: v for k, v in known.items() if k.startswith("down_tr")}
    assert_encoder_loaded(method, model, encoder)
    swin_file = tmp_path / "swin.pth"
    torch.save({"net": {f"module.backbone.{k}": v for k, v in _swin_state()[0].items()}}, swin_file)
    method, cfg, model = setup_public("suprem_unet", swin_file, preset="paper")
    with pytest.raises(BenchError, match="no encoder key matched"):
        encoder_init(method, cfg, model)


def test_input_window_is_suprems():
    window = HUWindow(-175.0, 250.0)
    hu = torch.tensor([-1000.0, -175.0, 37.5, 250.0, 1000.0])
    scaled = (hu + 1000.0) / 2000.0  # the harness's [0, 1] crops
    torch.testing.assert_close(window(scaled), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))


@pytest.mark.e2e
def test_public_regime_through_the_cli_at_tiny(tmp_path):
    from bench.config import compose
    from bench.registry import create_method, get_method

    cfg = compose({"method": "suprem_unet", "regime": "public", "preset": "tiny"}, get_method("suprem_unet"))
    unet = UNet3D(width=cfg.model.width)
    path = tmp_path / "suprem_unet_tiny.pth"
    torch.save({"net": {f"module.backbone.{k}": v for k, v in randomised(unet.state_dict()).items()}}, path)
    out = run_cli("run", "method=suprem_unet", "regime=public", "preset=tiny", "epochs=1",
                  f"weights.public={path}", f"out={tmp_path}/runs")
    assert out.returncode == 0, out.stderr
    assert create_method("suprem_unet", cfg).public_weights.filename.startswith("supervised_suprem_unet")
