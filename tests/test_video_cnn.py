"""Video-pretrained 3D CNNs: torchvision's layout at width 64, Kinetics checkpoints loading by value,
the grey-CT-as-clip input, and the three regimes end to end."""
import pytest
import torch
from torchvision.models import video as tv

from bench.config import compose
from bench.datasets.views import slice_positions
from bench.errors import BenchError
from bench.methods.video_cnn import VideoResNetEncoder
from bench.registry import create_method, get_method
from tests_helpers import encoder_init, run_cli

ARCHS = ("r3d_18", "mc3_18", "r2plus1d_18")


def _torchvision_state(arch: str) -> dict[str, torch.Tensor]:
    """torchvision's own network with seeded weights and non-trivial batch-norm tensors (known values
    that keep a forward pass finite)."""
    torch.manual_seed(len(arch))
    state = {k: v.clone() for k, v in getattr(tv, arch)(weights=None).state_dict().items()}
    for k, v in state.items():
        if k.endswith("running_var"):
            state[k] = torch.rand(v.shape) + 0.5
        elif k.endswith(("running_mean", "bias")) or (k.endswith("weight") and v.dim() == 1):
            state[k] = v + 0.1 * torch.randn(v.shape)
    return state


@pytest.mark.parametrize("arch", ARCHS)
def test_width_64_is_torchvisions_layout(arch):
    ours = VideoResNetEncoder(arch, 64).state_dict()
    theirs = {k: v for k, v in getattr(tv, arch)(weights=None).state_dict().items() if not k.startswith("fc.")}
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_kinetics_checkpoint_loads_every_tensor(arch, tmp_path):
    known = _torchvision_state(arch)
    path = tmp_path / f"{arch}-00000000.pth"
    torch.save(known, path)  # torchvision publishes plain state dicts
    cfg = compose({"method": arch, "regime": "public", "preset": "tiny", "model.width": "64",
                   "weights.public": str(path)}, get_method(arch))
    method = create_method(arch, cfg)
    model = method.build_model()
    info = encoder_init(method, cfg, model)
    assert info["load_report"]["missing"] == [] and info["load_report"]["unexpected"] == []
    loaded = model.encoder.state_dict()
    assert len(loaded) == len(known) - 2  # all but Kinetics' classifier fc.weight / fc.bias
    for key, value in loaded.items():
        assert torch.equal(value, known[key]), key
    # same features as torchvision's network with these weights, on a normalised RGB clip
    reference = getattr(tv, arch)(weights=None)
    reference.load_state_dict(known)
    reference.fc = torch.nn.Identity()
    reference.eval()
    model.eval()
    clip = torch.rand(2, 3, 8, 32, 32)
    normalised = (clip - model.encoder.mean) / model.encoder.std
    with torch.no_grad():
        torch.testing.assert_close(model.encoder(clip), reference(normalised))


def test_grey_ct_becomes_a_three_channel_clip_along_the_views_axis():
    enc = VideoResNetEncoder("r3d_18", 8, time_axis=2)
    x = torch.rand(1, 1, 4, 5, 6)
    clip = enc.as_clip(x)
    assert clip.shape == (1, 3, 6, 4, 5)  # time = axis 2 of the crop
    restored = clip * enc.std + enc.mean
    for c in range(3):
        torch.testing.assert_close(restored[0, c], x[0, 0].permute(2, 0, 1))


def test_frames_takes_equidistant_slices_along_the_views_axis():
    enc = VideoResNetEncoder("r3d_18", 8, time_axis=0, frames=4)
    x = torch.rand(2, 1, 12, 5, 6)
    clip = enc.as_clip(x) * enc.std + enc.mean
    assert clip.shape == (2, 3, 4, 5, 6)
    for t, position in enumerate(slice_positions(12, 4)):  # the slice-view rule: outermost dropped
        torch.testing.assert_close(clip[:, 0, t], x[:, 0, position])
    video = torch.rand(1, 3, 8, 5, 6)  # corpus clips keep their frames
    assert enc.as_clip(video).shape == video.shape
    few = VideoResNetEncoder("r3d_18", 8, time_axis=0, frames=11)  # 12 slices hold no 11 interior ones
    assert few.as_clip(x).shape == (2, 3, 12, 5, 6)


def test_negative_frames_is_one_error_line():
    out = run_cli("run", "method=r3d_18", "regime=scratch", "preset=tiny", "model.frames=-1", "epochs=1")
    assert out.returncode == 2
    assert "model.frames=-1" in out.stderr and "Traceback" not in out.stderr


def test_a_narrow_network_refuses_the_kinetics_file(tmp_path):
    path = tmp_path / "r3d_18.pth"
    torch.save(_torchvision_state("r3d_18"), path)
    cfg = compose({"method": "r3d_18", "regime": "public", "preset": "tiny", "weights.public": str(path)},
                  get_method("r3d_18"))
    method = create_method("r3d_18", cfg)
    with pytest.raises(BenchError, match="r3d_18.pth"):
        encoder_init(method, cfg, method.build_model())


def test_r2plus1d_runs_every_regime_at_tiny(tmp_path):
    out = run_cli("run", "method=r2plus1d_18", "preset=tiny", "epochs=1", "pretrain.epochs=1",
                  f"out={tmp_path}", "progress=false")
    assert out.returncode == 0, out.stderr
    for regime in ("scratch", "public", "public_to_vertebrae"):
        assert (tmp_path / "single" / f"r2plus1d_18-{regime}-s0" / "metrics.json").exists()
