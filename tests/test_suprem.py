"""SuPreM: both published containers (supervised `net` with `module.backbone.`, self-supervised `model`
with `encoder.` and the doubled stage index) load every encoder tensor by value; the input window is
SuPreM's; a file of the other backbone is one line; without a file, the supervised stand-in segments
the body-CT corpus's organs and hands its encoder to finetuning."""
import pytest
import torch
from monai.networks.nets import SwinUNETR

from bench.errors import BenchError
from bench.methods.inputs import HUWindow
from bench.methods.models_genesis import UNet3D
from tests_helpers import assert_encoder_loaded, encoder_init, randomised, setup_public


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
    from bench.cli import main

    assert main(["run", "method=suprem_unet", "regime=public", "preset=tiny", "epochs=1", f"weights.public={path}",
                 f"out={tmp_path}/runs"]) == 0
    assert create_method("suprem_unet", cfg).public_weights.filename.startswith("supervised_suprem_unet")


def test_organ_labels_are_the_geometry_the_patch_was_painted_from():
    import numpy as np

    from bench.datasets.corpora import ORGANS, body_ct_patch

    seen = set()
    for index in range(12):
        hu, organs = body_ct_patch(index, 32, 96.0, seed=0, organs=True)
        assert np.array_equal(hu, body_ct_patch(index, 32, 96.0, seed=0))  # the same patch as without labels
        assert organs.dtype == np.uint8 and organs.shape == hu.shape and organs.max() < len(ORGANS)
        for name, (lo, hi) in {"lung_right": (-1100, -500), "lung_left": (-1100, -500), "liver": (-50, 200),
                               "rib": (200, 1500), "vertebra": (100, 400), "aorta": (-50, 400)}.items():
            inside = organs == ORGANS.index(name)
            if inside.sum() > 50:  # the median survives the blur and noise
                assert lo < np.median(hu[inside]) < hi, name
                seen.add(name)
    assert {"liver", "lung_left", "lung_right", "rib"} <= seen


@pytest.mark.parametrize("name", ["suprem", "suprem_unet"])
def test_supervised_stand_in_learns_the_organs_and_hands_over_its_encoder(name):
    import numpy as np

    from bench.config import compose
    from bench.datasets.corpora import body_ct_patch
    from bench.datasets.pretext import OrganCorpus
    from bench.registry import create_method, get_method
    from bench.transfer import check_contract

    cfg = compose({"method": name, "regime": "public", "preset": "tiny"}, get_method(name))
    method = create_method(name, cfg)
    assert method.pretraining_plan("public") == ["public"] and method.pretext_data_kind("vertebrae") is None
    check_contract(method, ["public"])  # every finetuning-encoder tensor comes from the pretext
    pairs = [body_ct_patch(i, cfg.crop_size, 96.0, seed=0, organs=True) for i in range(4)]
    corpus = OrganCorpus(np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]), seed=0)
    x, organs = (torch.stack(t) for t in zip(*(corpus[i] for i in range(4))))
    assert organs.dtype == torch.int64 and organs.shape == x.shape[:1] + x.shape[2:]
    torch.manual_seed(0)
    pretext = method.build_pretext("public")
    optimiser = torch.optim.AdamW(pretext.parameters(), lr=3e-3)
    losses = []
    for _ in range(16):
        loss = pretext.step(pretext, (x, organs))["loss"]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.e2e
def test_public_stand_in_through_the_cli_at_tiny(tmp_path, capsys):
    import json

    from bench.cli import main

    assert main(["run", "method=suprem_unet", "regime=public", "preset=tiny", "epochs=1", "pretrain.epochs=1",
                 f"out={tmp_path}/runs"]) == 0
    pretraining = json.loads(next((tmp_path / "runs").rglob("metrics.json")).read_text())["pretraining"]
    assert pretraining["plan"] == ["public"] and pretraining["init"].startswith("artifact ")
    assert pretraining["load_report"]["missing"] == [] and pretraining["pretrain_curve"]
