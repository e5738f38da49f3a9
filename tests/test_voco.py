"""VoCo: the published checkpoint layout loads into the Swin v2 encoder, tensor by tensor."""
import pytest
import torch
from monai.networks.nets import SwinUNETR

from bench.errors import BenchError
from bench.registry import get_method
from bench.suites import expand
from tests_helpers import encoder_init, randomised, setup_public


def _voco_checkpoint(feature=48):
    """A whole MONAI SwinUNETR(use_v2=True) as VoCo saves it: `module.` prefixes, encoder as `swin_vit.`."""
    net = SwinUNETR(in_channels=1, out_channels=14, feature_size=feature, use_v2=True)
    known = randomised(net.state_dict())
    published = {f"module.{k.replace('swinViT.', 'swin_vit.')}": v for k, v in known.items()}
    encoder = {k[len("swinViT."):]: v for k, v in known.items() if k.startswith("swinViT.")}
    assert any(k.startswith("layers1c.") for k in encoder)  # the v2 residual blocks are part of the encoder
    return published, encoder


def test_voco_checkpoint_loads_every_encoder_tensor(tmp_path):
    published, encoder = _voco_checkpoint()
    path = tmp_path / "VoCo_B_SSL_head.pt"
    torch.save(published, path)
    method, cfg, model = setup_public("voco", path, preset="paper")
    report = encoder_init(method, cfg, model)["load_report"]
    assert report["matched"] == len(encoder) and not report["missing"] and not report["shape_mismatched"]
    loaded = method.finetune_encoder(model).state_dict()
    for key, value in encoder.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)
    assert model(torch.zeros(1, 1, 64, 64, 64)).shape == (1, 2)


def test_a_voco_l_file_into_voco_b_is_one_line(tmp_path):
    published, _ = _voco_checkpoint(feature=96)
    path = tmp_path / "VoCo_L_SSL_head.pt"
    torch.save({"state_dict": published}, path)
    method, cfg, model = setup_public("voco", path, preset="paper")
    with pytest.raises(BenchError, match="tensors matched by name and shape"):
        encoder_init(method, cfg, model)


def test_suites_of_all_methods_run_voco_from_scratch_only():
    runs = expand({"name": "all", "runs": "all"}, seeds=1)
    assert {r["regime"] for r in runs if r["method"] == "voco"} == {"scratch"}
    assert get_method("voco").runs_without_a_file("scratch") and not get_method("voco").runs_without_a_file("public")
    assert get_method("swin_unetr").runs_without_a_file("public")
