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


def _training_head(known: dict, ddp: bool) -> dict:
    """voco_train.py's VoCoHead state dict: the Swin UNETR as `backbone` (its encoder `swinViT`),
    projection heads beside it, `module.` when trained under DistributedDataParallel."""
    heads = {"student.layer1.0.weight": torch.zeros(4, 4), "teacher.layer1.0.weight": torch.zeros(4, 4)}
    state = {**{f"backbone.{k}": v for k, v in known.items()}, **heads}
    return {f"module.{k}" if ddp else k: v for k, v in state.items()}


@pytest.mark.parametrize("layout", ["model_final_epoch.pt", "final_model.pth", "final_model_ddp.pth"])
def test_voco_training_checkpoints_load_every_encoder_tensor(tmp_path, layout):
    """The files voco_train.py writes: the final checkpoint ({"epoch", "state_dict", "optimizer":
    optimizer.state_dict()}, under DDP) and the final model (the state dict alone, with and without
    DDP). Its periodic checkpoints pickle the optimizer object itself, which weights_only refuses."""
    net = SwinUNETR(in_channels=1, out_channels=14, feature_size=48, use_v2=True)
    known = randomised(net.state_dict())
    encoder = {k[len("swinViT."):]: v for k, v in known.items() if k.startswith("swinViT.")}
    if layout == "model_final_epoch.pt":
        obj = {"epoch": 100, "state_dict": _training_head(known, ddp=True),
               "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]}}
    else:
        obj = _training_head(known, ddp=layout.endswith("_ddp.pth"))
    path = tmp_path / layout
    torch.save(obj, path)
    method, cfg, model = setup_public("voco", path, preset="paper")
    report = encoder_init(method, cfg, model)["load_report"]
    assert report["matched"] == len(encoder) and not report["missing"]
    assert len([k for k in encoder if "relative_position_index" not in k]) == 126  # parameters; 8 index buffers
    loaded = method.finetune_encoder(model).state_dict()
    for key, value in encoder.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)


def test_a_file_whose_encoder_keys_carry_an_unknown_prefix_shows_the_files_keys(tmp_path):
    published, _ = _voco_checkpoint()
    path = tmp_path / "renamed.pt"
    torch.save({k.replace("module.swin_vit.", "net.encoder.swin."): v for k, v in published.items()}, path)
    method, cfg, model = setup_public("voco", path, preset="paper")
    with pytest.raises(BenchError) as err:
        encoder_init(method, cfg, model)
    assert "the file's keys look like: net.encoder.swin." in str(err.value) and "\n" not in str(err.value)


def test_a_voco_l_file_into_voco_b_is_one_line(tmp_path):
    published, _ = _voco_checkpoint(feature=96)
    path = tmp_path / "VoCo_L_SSL_head.pt"
    torch.save({"state_dict": published}, path)
    method, cfg, model = setup_public("voco", path, preset="paper")
    with pytest.raises(BenchError, match="tensors matched by name and shape"):
        encoder_init(method, cfg, model)


def test_suites_of_all_methods_run_only_what_needs_no_file():
    """`runs: all` runs a regime that needs public weights only where the method has a pretext to make
    its embedded stand-in (voco: volume contrast; suprem: the supervised organ segmentation); a method
    whose public regime is a file alone runs from scratch only."""
    from bench.methods.base import Method

    class FileOnly(Method):
        regimes = ("scratch", "public")

    runs = expand({"name": "all", "runs": "all"}, seeds=1)
    assert {r["regime"] for r in runs if r["method"] == "voco"} == {"scratch", "public", "public_to_vertebrae"}
    assert {r["regime"] for r in runs if r["method"] == "suprem"} == {"scratch", "public"}
    assert get_method("voco").runs_without_a_file("public") and get_method("suprem").runs_without_a_file("public")
    assert FileOnly.runs_without_a_file("scratch") and not FileOnly.runs_without_a_file("public")


def test_overlap_labels_are_the_shares_of_each_base_crop():
    from bench.methods.voco import overlap_labels

    offsets = torch.tensor([[0, 0], [8, 0], [4, 12]])  # crops of edge 16 over a 2 x 2 grid of 16-voxel bases
    labels = overlap_labels(offsets, 16, 2)
    torch.testing.assert_close(labels[0], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(labels[1], torch.tensor([0.5, 0.0, 0.5, 0.0]))  # half on (0,0), half on (1,0)
    torch.testing.assert_close(labels[2], torch.tensor([0.75 * 0.25, 0.75 * 0.75, 0.25 * 0.25, 0.25 * 0.75]))
    torch.testing.assert_close(labels.sum(1), torch.ones(3))


def test_volume_contrast_trains_and_its_teacher_follows_the_student():
    from bench.config import compose

    cfg = compose({"method": "voco", "regime": "public_to_vertebrae", "preset": "tiny"}, get_method("voco"))
    method = get_method("voco")(cfg)
    torch.manual_seed(0)
    pretext = method.build_pretext()
    out = pretext(torch.rand(2, 1, 32, 32, 32))
    assert set(out) == {"loss", "overlap", "disjoint", "bases"} and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is None for p in pretext.teacher.parameters())
    with torch.no_grad():
        for p in pretext.encoder.parameters():
            p.add_(1.0)
    before = next(pretext.teacher["encoder"].parameters()).clone()
    pretext.on_step(0, 1)
    after, student = next(pretext.teacher["encoder"].parameters()), next(pretext.encoder.parameters())
    torch.testing.assert_close(after, 0.9 * before + 0.1 * student)
