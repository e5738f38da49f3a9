"""CT-FM: the Hub safetensors file (the encoder's own keys) and the Lightning checkpoint (`backbone.`
under `state_dict`) load every encoder tensor by value; the input is CT-FM's (SPL, [-1024, 2048] HU);
another network's file is one line."""
import pytest
import torch
from monai.networks.nets.segresnet_ds import SegResEncoder
from safetensors.torch import save_file

from bench.errors import BenchError
from bench.methods.ctfm import CTFMEncoder, CTFMParams
from tests_helpers import assert_encoder_loaded, encoder_init, randomised, run_cli, setup_public


def _encoder_state(**kwargs):
    net = SegResEncoder(spatial_dims=3, in_channels=1, init_filters=32, blocks_down=(1, 2, 2, 4, 4), **kwargs)
    return randomised(net.state_dict())


def test_hub_safetensors_file_loads_every_encoder_tensor(tmp_path):
    known = _encoder_state()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in known.items()}, str(path))
    method, cfg, model = setup_public("ctfm", path, preset="paper")
    report = encoder_init(method, cfg, model)["load_report"]
    assert report["matched"] == len(known) and not report["missing"]
    assert_encoder_loaded(method, model, known)


def test_lightning_checkpoint_with_backbone_prefix_loads(tmp_path):
    known = _encoder_state()
    path = tmp_path / "epoch=449-step=225000-v1-no-norm.ckpt"
    head = {"criterion.projection.0.weight": torch.randn(128, 512)}  # SimCLR's projection head: not the encoder
    torch.save({"epoch": 449, "global_step": 225000,
                "state_dict": {**{f"backbone.{k}": v for k, v in known.items()}, **head}}, path)
    method, cfg, model = setup_public("ctfm", path, preset="paper")
    encoder_init(method, cfg, model)
    assert_encoder_loaded(method, model, known)


def test_a_file_of_another_network_is_one_line(tmp_path):
    instance_norm = _encoder_state(norm="instance")  # no running statistics: keys missing
    path = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in instance_norm.items()}, str(path))
    method, cfg, model = setup_public("ctfm", path, preset="paper")
    with pytest.raises(BenchError, match="encoder tensors matched by name and shape; not matched: .*running_mean"):
        encoder_init(method, cfg, model)


def test_input_is_spl_in_ctfms_window():
    encoder = CTFMEncoder(CTFMParams(init_filters=4, blocks_down=[1]))
    x = torch.zeros(1, 1, 2, 3, 4)
    x[0, 0, 1, 0, 0] = 1.0  # the voxel at the patient's right (x=1), posterior (y=0), inferior (z=0): +1000 HU
    seen = encoder.orient(encoder.window(x))
    assert seen.shape == (1, 1, 4, 3, 2)  # axes S, P, L
    # axis 0 increases towards superior (z = 0 stays 0), axis 1 towards posterior (y = 0 -> 2), axis 2
    # towards the left (x = 1, the right side -> 0)
    assert seen[0, 0, 0, 2, 0] == pytest.approx((1000 + 1024) / 3072)
    assert seen[0, 0, 1, 1, 1] == pytest.approx((-1000 + 1024) / 3072)


def test_intra_sample_loss_equals_ctfms_loop():
    """The batched loss against CT-FM's per-sample, per-crop loop (IntraSampleNTXEntLoss, permute=True)."""
    import torch.nn.functional as F

    from bench.methods.ctfm import intra_sample_nt_xent

    torch.manual_seed(0)
    b, k, t = 3, 4, 0.1
    z0, z1 = torch.randn(b, k, 8), torch.randn(b, k, 8)
    a, c = F.normalize(z0, dim=-1), F.normalize(z1, dim=-1)
    total = 0.0
    for s in range(b):
        per = 0.0
        for i in range(k):
            negatives = torch.stack([v for j in range(k) if j != i for v in (a[s, j], c[s, j])])
            logits = torch.cat([(a[s, i] @ c[s, i])[None], negatives @ a[s, i]]) / t
            per += F.cross_entropy(logits[None], torch.zeros(1, dtype=torch.long))
        total += per / k
    torch.testing.assert_close(intra_sample_nt_xent(z0, z1, t), total / b)
    z1_same = z0.clone()  # identical views of well separated crops: a loss near zero
    assert intra_sample_nt_xent(torch.eye(k).repeat(b, 1, 1), torch.eye(k).repeat(b, 1, 1), 0.05) < 1e-3
    assert intra_sample_nt_xent(z0, z1_same, t) < intra_sample_nt_xent(z0, z1, t)


@pytest.mark.e2e
def test_intra_sample_simclr_then_finetuning_through_the_cli_and_in_the_report(tmp_path):
    """public_to_vertebrae at tiny (the public stand-in, then the vertebrae, then finetuning), and the
    report's "Today's checkpoints" table holds the run."""
    import json

    out = run_cli("run", "method=ctfm", "regime=public_to_vertebrae", "preset=tiny", "epochs=1", "pretrain.epochs=1",
                  f"out={tmp_path}/runs")
    assert out.returncode == 0, out.stderr
    metrics = json.loads(next((tmp_path / "runs" / "single").glob("*/metrics.json")).read_text())
    assert metrics["pretraining"]["plan"] == ["public", "vertebrae"]
    assert not metrics["pretraining"]["load_report"]["missing"]
    out = run_cli("report", f"{tmp_path}/runs", f"out={tmp_path}/report", "bootstrap=20")
    assert out.returncode == 0, out.stderr
    html = (tmp_path / "report" / "index.html").read_text()
    today = html[html.index("Today&#39;s checkpoints"):]
    assert "ctfm" in today[:today.index("</table>")] and "Other runs" not in html


def test_gradcam_runs_on_the_last_level_and_comes_back_to_ras():
    """Grad-CAM reads the last level's blocks (their last convolution's output is added to in place),
    taken in CT-FM's SPL frame and turned back into the crop's RAS."""
    from bench.attribution import gradcam
    from bench.config import compose
    from bench.registry import create_method, get_method

    cfg = compose({"method": "ctfm", "preset": "tiny", "regime": "scratch"}, get_method("ctfm"))
    method = create_method("ctfm", cfg)
    model = method.build_model().eval()
    x = torch.rand(1, 1, 32, 32, 32)
    cam = method.cam_to_input(gradcam(model, x, method.cam_layer(model)))
    assert cam.shape == (1, 32, 32, 32) and torch.isfinite(cam).all()
    ras = torch.rand(1, 5, 6, 7)  # a map in RAS, seen in SPL, back in RAS
    spl = model.encoder.orient(ras[:, None])[:, 0]
    assert spl.shape == (1, 7, 6, 5) and torch.equal(method.cam_to_input(spl), ras)
