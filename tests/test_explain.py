"""Where the models look: attribution maps that can fail, closed-form rollout, ground-truth masks,
kept models, and `bench explain` on runs of every model family."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from bench import attribution
from bench.datasets import synthetic
from bench.explain_maps import choose
from bench.explain_scores import baselines, deletion_curves, map_peak, mask_scores
from bench.registry import list_methods
from tests_helpers import SHARED_DATA, run_cli


class _Gate(nn.Module):
    def __init__(self, region: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("region", torch.from_numpy(region.astype(np.float32)))

    def forward(self, x):
        return x * self.region


class _RegionModel(nn.Module):
    """A classifier whose fracture logit reads only the voxels of `region` (a boolean cube): its
    feature maps (the Grad-CAM layer `features`) are zero elsewhere. It reads their structure (the sum
    of squares), which replacing a cube by its mean (occlusion) removes."""

    def __init__(self, region: np.ndarray) -> None:
        super().__init__()
        conv = nn.Conv3d(1, 2, 3, padding=1)
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[:, 0, 1, 1, 1] = torch.tensor([-1.0, 1.0])  # the voxel itself, one sign per class
            conv.bias.zero_()
        self.features = nn.Sequential(conv, _Gate(region))
        self.size = float(region.sum())

    def forward(self, x):
        evidence = 20 * (self.features(x)[:, 1] ** 2).sum(dim=(1, 2, 3)) / self.size
        return torch.stack([-evidence, evidence], dim=1)


def _region(shape=(16, 16, 16), lo=2, hi=7):
    r = np.zeros(shape, bool)
    r[lo:hi, lo:hi, lo:hi] = True
    return r


def _input(seed=0):
    g = torch.Generator().manual_seed(seed)
    return 0.5 + 0.2 * torch.rand(1, 1, 16, 16, 16, generator=g)


def _mass(m: np.ndarray, region: np.ndarray) -> float:
    return float(m[region].sum() / m.sum())


def test_gradcam_and_occlusion_put_their_mass_where_the_model_reads():
    region = _region(lo=3, hi=9)  # on the grid of the 3-voxel occlusion cubes
    model = _RegionModel(region).eval()
    x = _input()
    cam = attribution.gradcam(model, x, "features")[0].numpy()
    occ = attribution.occlusion(model, x, mask_size=3)[0].numpy()
    assert _mass(cam, region) > 0.95
    assert _mass(occ, region) > 0.9
    intact = float(attribution.fracture_log_odds(model(x)))

    def predict(crops):  # P(fracture), 0.5 for the intact input: the deletion curve has room both ways
        with torch.no_grad():
            log_odds = attribution.fracture_log_odds(model(torch.from_numpy(crops)[:, None]))
            return torch.sigmoid(log_odds - intact).numpy()

    maps = {"gradcam": cam / cam.sum(), "occlusion": occ / occ.sum(), **baselines(region.shape, 0)}
    deletion = deletion_curves(predict, x[0, 0].numpy(), maps)
    for name in ("gradcam", "occlusion"):  # blurring what the map ranks first costs the fracture call most
        assert deletion[name] < -0.05 and deletion[name] < 3 * deletion["random"] <= 0
    chance = region.mean()
    random = baselines(region.shape, 0)["random"]
    assert abs(_mass(random, region) - chance) < 0.02


def test_occlusion_cubes_are_centred_on_the_crop_centre():
    """A model that reads only the centre of the crop: a centred cube hides it, and the map points there.
    With 4 cubes per edge the centre lies on cube corners: no one occlusion hides it."""
    centre = _region(shape=(18, 18, 18), lo=7, hi=11)
    model = _RegionModel(centre).eval()
    x = 0.5 + 0.2 * torch.rand(1, 1, 18, 18, 18, generator=torch.Generator().manual_seed(0))
    assert attribution.centred_cubes((18, 18, 16)) == (6, 6, 6)
    centred = attribution.occlusion(model, x, attribution.centred_cubes(x.shape[2:]))[0].numpy()
    even = attribution.occlusion(model, x, 5)[0].numpy()  # 4 cubes per edge (0, 5, 10, 13)
    truth = centre.astype(np.uint8)
    assert _mass(centred, centre) > 5 * centre.mean() and mask_scores(centred, truth, 0)["point_body"] == 1.0
    assert even.max() < 0.5 * centred.max()  # no even-grid cube darkens the whole centre: a smaller log-odds drop
    with pytest.raises(ValueError, match="odd"):
        attribution.centred_cubes((18, 18, 18), per_axis=4)


def test_a_model_that_ignores_the_region_scores_like_chance():
    region, elsewhere = _region(), _region(lo=9, hi=14)
    model = _RegionModel(elsewhere).eval()  # reads another cube entirely
    cam = attribution.gradcam(model, _input(), "features")[0].numpy()
    assert _mass(cam, region) < region.mean() + 0.05
    peak = np.unravel_index(int(np.argmax(cam)), cam.shape)
    assert not region[peak]
    truth = region.astype(np.uint8)
    assert mask_scores(cam / cam.sum(), truth, 1)["point_body"] == 0.0
    right = _RegionModel(region).eval()
    good = attribution.gradcam(right, _input(), "features")[0].numpy()
    assert mask_scores(good / good.sum(), truth, 1)["point_body"] == 1.0


def test_the_pointing_game_takes_the_centre_of_a_flat_maximum():
    """Occlusion cubes and token patches give flat plateaus: the peak is their centroid, not their corner."""
    m = np.zeros((12, 12, 12), np.float32)
    m[4:8, 4:8, 4:8] = 1.0  # one cube at the maximum
    m[0:4, 0:4, 0:4] = 0.5
    assert map_peak(m) == (6, 6, 6)
    body = np.zeros(m.shape, np.uint8)
    body[5:7, 5:7, 5:7] = 1  # a small body at the centre of the maximal cube
    assert mask_scores(m / m.sum(), body, 0)["point_body"] == 1.0
    smooth = np.random.default_rng(0).random(m.shape)
    assert map_peak(smooth) == np.unravel_index(int(np.argmax(smooth)), m.shape)  # a unique maximum stays put
    flat = np.full(m.shape, 1.0 / m.size, np.float32)  # nothing changed the output: the map points nowhere
    assert map_peak(flat) is None and mask_scores(flat, body, 1)["point_body"] == 0.0


def _explained(maps: list[str], lift: float, architecture: str, vertebrae: int = 4) -> dict:
    scores = {"random": {"mass_body": 0.02, "point_body": 0.0, "deletion": 0.0},
              "gaussian": {"mass_body": 0.2, "point_body": 1.0, "deletion": 0.0}}
    scores.update({m: {"mass_body": 0.02 * lift, "point_body": float(lift > 1), "deletion": 0.1 * (1 - lift)}
                   for m in maps})
    return {"maps": maps + ["random", "gaussian"], "architecture": architecture,
            "vertebrae": [{"scores": scores, "has_mask": True}] * vertebrae}


def test_family_summary_measures_lift_over_chance_per_run():
    from bench.reports.explain_section import group_rows

    rows = group_rows([("public", _explained(["occlusion", "rollout", "last_attention"], 3.0, "transformer")),
                       ("vertebrae", _explained(["occlusion", "rollout", "last_attention"], 1.0, "transformer")),
                       ("public", _explained(["occlusion", "gradcam"], 2.0, "transformer")),  # a Swin
                       ("scratch", _explained(["occlusion", "gradcam"], 1.0, "convolutional"))])
    by_group = {r["group"]: r for r in rows}
    assert set(by_group) == {"transformer, pretrained", "convolutional, scratch"}  # empty families left out
    transformers = by_group["transformer, pretrained"]
    assert transformers["runs"] == 3 and transformers["occlusion_lift"].startswith("2.00 [")  # (3 + 1 + 2) / 3
    assert transformers["native"] == "gradcam / rollout" and transformers["gaussian_lift"] == "10.00"
    assert transformers["occlusion_deletion"].startswith("-0.10 [")
    conv = by_group["convolutional, scratch"]
    assert conv["native"] == "gradcam" and conv["native_lift"] == "1.00" and conv["native_hit"] == "0.00"


def test_rollout_of_identity_attention_is_the_identity():
    n, layers = 5, 3
    eye = torch.eye(n).expand(2, 4, n, n)
    np.testing.assert_allclose(attribution.attention_rollout([eye] * layers)[0].numpy(), np.eye(n), atol=1e-6)


def test_rollout_of_uniform_attention_has_its_closed_form():
    """(0.5 U + 0.5 I)^L = 0.5^L I + (1 - 0.5^L) U, U the uniform (idempotent) matrix."""
    n, layers = 6, 4
    uniform = torch.full((1, 3, n, n), 1.0 / n)
    got = attribution.attention_rollout([uniform] * layers)[0].numpy()
    expected = 0.5**layers * np.eye(n) + (1 - 0.5**layers) * np.full((n, n), 1.0 / n)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    relevance = attribution.token_relevance(torch.from_numpy(expected)[None], prefix=1, pooling="cls")
    np.testing.assert_allclose(relevance.numpy(), np.full((1, n - 1), (1 - 0.5**layers) / n), atol=1e-6)


def test_synthetic_masks_mark_the_body_and_only_fractures_deform():
    masks: list[np.ndarray] = []
    images, table = synthetic.generate(8, 3, 4, 0.4, 20, 96, 24, seed=5, masks=masks)
    again, _ = synthetic.generate(8, 3, 4, 0.4, 20, 96, 24, seed=5)
    np.testing.assert_array_equal(images, again)  # the masks draw no random numbers
    masks = np.stack(masks)
    centre = tuple(s // 2 for s in images.shape[1:])
    assert all((m[centre] & 1) for m in masks)  # the crop centre lies in the centre body
    deformed = np.array([(m & 2).any() for m in masks])
    assert deformed[table.label.to_numpy() == 1].all() and not deformed[table.label.to_numpy() == 0].any()


def test_choose_takes_the_most_confident_of_each_kind_and_is_stable():
    p = pd.DataFrame({"label": [1, 1, 1, 0, 0, 0, 1], "prediction": [1, 1, 0, 1, 1, 0, 0],
                      "score": [0.9, 0.95, 0.1, 0.8, 0.6, 0.1, 0.3]})
    chosen = choose(p, 1)
    assert chosen.kind.tolist() == ["TP", "FN", "FP"] and chosen.row.tolist() == [1, 2, 3]
    assert choose(p, 2).equals(choose(p, 2))


FAMILIES = {"resnet18-scratch-s0": "gradcam", "vit_b-scratch-s0": "rollout", "video_mae-public-s0": "rollout",
            "r3d_18-scratch-s0": "gradcam", "mae3d-vertebrae-s0": "rollout"}  # run folder -> its model's map


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, bench_cache):
    from bench.cli import main

    out = tmp_path_factory.mktemp("explain-runs")
    for folder in FAMILIES:
        method, regime, _ = folder.split("-")
        assert main(["run", f"method={method}", f"regime={regime}", "preset=tiny", f"out={out}", "progress=false",
                     "epochs=1", "pretrain.epochs=1"]) == 0
    return out / "single"


def test_runs_keep_their_model_unless_told_not_to(tiny_runs, tmp_path):
    assert (tiny_runs / "resnet18-scratch-s0" / "model.safetensors").is_file()
    result = run_cli("run", "method=resnet18", "regime=scratch", "preset=tiny", f"out={tmp_path}", "progress=false",
                     "epochs=1", "save_model=false")
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "single" / "resnet18-scratch-s0" / "model.safetensors").exists()


def test_explain_cli_on_every_model_family(tiny_runs):
    folders = [tiny_runs / name for name in FAMILIES]
    before = {f: sorted(p.name for p in f.iterdir()) for f in folders}
    result = run_cli("explain", *map(str, folders), "n=1")
    assert result.returncode == 0, result.stderr
    for folder in folders:
        assert sorted(p.name for p in folder.iterdir()) == sorted(before[folder] + ["explain"])
        report = json.loads((folder / "explain" / "explain.json").read_text())
        expected_map = FAMILIES[folder.name]
        assert expected_map in report["maps"] and "occlusion" in report["maps"]
        assert set(report["baselines"]) == {"random", "gaussian"}
        assert report["vertebrae"], "nothing explained"
        first = report["vertebrae"][0]
        assert first["has_mask"] and 0 <= first["scores"]["random"]["mass_body"] <= 1
        crop_edge = 32  # tiny preset crops
        image = nib.load(folder / "explain" / first["files"][expected_map])
        assert image.shape == (crop_edge,) * 3
        assert (folder / "explain" / first["files"]["png"]).stat().st_size > 1000
        if folder.name.startswith(("mae3d", "video_mae")):  # an MAE encoder: its pretext's reconstruction
            assert np.isfinite(report["reconstruction"]["mse_hidden"])
            assert (folder / "explain" / first["files"]["mae_png"]).stat().st_size > 1000
            recon = nib.load(folder / "explain" / first["files"]["mae_reconstruction"])
            if folder.name.startswith("mae3d"):  # in the frame of the map over the same crop
                assert recon.shape == (crop_edge,) * 3 and np.allclose(recon.affine, image.affine)
            else:  # the video pretext's clip: 16 slices padded to the 64-pixel video frames, spanning the crop
                assert recon.shape == (16, 64, 64) and report["reconstruction"]["stage"] == "public"
                assert np.allclose(np.array(recon.shape) * recon.header.get_zooms(), image.header.get_zooms()[0] * 32)
        else:
            assert report["reconstruction"] is None
        summary = report["summary"][expected_map]["deletion"]
        assert summary["n"] == len(report["vertebrae"]) and np.isfinite(summary["mean"])
    report = run_cli("report", str(tiny_runs), f"out={tiny_runs.parent / 'report'}")
    assert report.returncode == 0, report.stderr
    html = (tiny_runs.parent / "report" / "index.html").read_text()
    assert "Where the models look" in html and ">gaussian<" in html and ">random<" in html
    assert all(f">{g}<" in html for g in ("transformer, scratch", "transformer, pretrained", "convolutional, scratch"))
    assert html.count('class="thumb"') >= len(folders)
    assert html.count('class="thumb" tabindex="0"') == html.count('src="data:image/jpeg;base64,')  # light page
    again = run_cli("explain", str(folders[0]), "n=1")
    assert again.returncode == 0
    same = json.loads((folders[0] / "explain" / "explain.json").read_text())
    assert [v["patient_id"] for v in same["vertebrae"]] == [
        v["patient_id"] for v in json.loads((folders[0] / "explain" / "explain.json").read_text())["vertebrae"]]


def test_explain_bad_input_is_one_line(tiny_runs, tmp_path):
    not_run = run_cli("explain", str(tmp_path))
    assert not_run.returncode == 2 and "is not a run folder" in not_run.stderr
    assert len(not_run.stderr.strip().splitlines()) == 1
    import shutil

    copy = tmp_path / "resnet18-scratch-s0"
    shutil.copytree(tiny_runs / "resnet18-scratch-s0", copy, ignore=shutil.ignore_patterns("explain"))
    (copy / "model.safetensors").unlink()
    missing = run_cli("explain", str(copy))
    assert missing.returncode == 2 and "has no model.safetensors" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    (copy / "model.safetensors").write_bytes(b"not a safetensors file")
    broken = run_cli("explain", str(copy))
    assert broken.returncode == 2 and "not a readable safetensors file" in broken.stderr
    bad_n = run_cli("explain", str(tiny_runs / "resnet18-scratch-s0"), "n=0")
    assert bad_n.returncode == 2 and "'n'" in bad_n.stderr


def test_real_crop_map_opens_in_the_crops_frame_and_is_scored(tiny_runs, tmp_path):
    """An ingested crop from ../shared/data carries its centre vertebra's mask; its map is a NIfTI
    on the crop's grid and the mask-based scores run."""
    from bench.datasets.cropstore import open_masks, open_store
    from bench.datasets.ingest import Case, IngestOptions
    from bench.datasets.ingest_many import ingest
    from bench.explain_maps import load_run, maps_of
    from bench.explain_output import write_outputs

    store, _ = ingest([Case(str(SHARED_DATA / "totalseg_example_ct.nii.gz"),
                            str(SHARED_DATA / "totalseg_example_ct_vertebrae_seg.nii.gz"), "p1")],
                      IngestOptions(label_map="totalseg_v2", size=32, spacing=3.0), str(tmp_path / "store"),
                      workers=1, progress=False)
    crops, manifest, _ = open_store(store)
    masks = open_masks(store, len(crops))
    assert masks is not None and masks.shape == crops.shape
    assert all(m[16, 16, 16] & 1 for m in masks)  # each crop centres on its own vertebra
    cfg, method, model, _ = load_run(tiny_runs / "resnet18-scratch-s0")
    crop, truth = np.asarray(crops[0]), np.asarray(masks[0])
    maps = maps_of(method, cfg, model, crop)
    scores = mask_scores(maps["gradcam"], truth, 0)
    assert 0 <= scores["mass_body"] <= 1 and scores["point_body"] in (0.0, 1.0)
    files = write_outputs(tmp_path, "real", crop, truth, maps, 3.0)
    image = nib.load(tmp_path / files["gradcam"])
    assert image.shape == crop.shape and np.allclose(np.diag(image.affine)[:3], 3.0)


@pytest.mark.parametrize("name", ["vit_b", "video_mae", "vit_unetr"])
def test_token_layout_is_the_encoders_own_grid(name):
    from bench.registry import create_method
    from bench.run import resolve_runs

    cfg = resolve_runs({"method": name, "regime": "scratch", "preset": "tiny"})[0]
    method = create_method(name, cfg)
    prefix, layout_grid, _ = method.token_layout()
    if method.input_format == "slices":
        x = torch.zeros(1, 3, cfg.views.frames, method.frame_size(), method.frame_size())
    else:
        x = torch.zeros(1, 1, cfg.crop_size, cfg.crop_size, cfg.crop_size)
    attentions = attribution.attention_maps(method.build_model(), x)
    assert attentions[-1].shape[-1] == prefix + int(np.prod(layout_grid))  # tokens = prefix + grid


def test_video_mae_reconstruction_keeps_the_visible_patches_of_the_target_frames():
    from bench.methods.video_mae import KINETICS_MEAN, KINETICS_STD, VideoMAE

    mae = VideoMAE(16, 32, 8, 48, 1, 2, 32, 1, 2, mask_ratio=0.75, norm_pix_loss=True).eval()
    x = torch.rand(2, 3, 16, 32, 32) * 0.5 + 0.25
    target = mae.clip_of(mae.target(x) * KINETICS_STD + KINETICS_MEAN)  # the target frames, shown per tubelet
    idx = torch.linspace(0, 15, 8).round().long()
    assert torch.allclose(target[:, :, ::2], x[:, :, idx], atol=1e-6)
    assert torch.equal(target[:, :, ::2], target[:, :, 1::2])
    torch.manual_seed(0)
    with torch.no_grad():
        masked, recon = mae.reconstruct(x)
    assert masked.shape == recon.shape == x.shape
    hidden = (masked == 0).all(dim=1, keepdim=True).expand_as(masked)
    assert hidden[:, 0].float().mean().item() == pytest.approx(0.75)  # 48 of 64 tubelets blanked
    assert torch.allclose(recon[~hidden], target[~hidden], atol=1e-6)
    assert not torch.allclose(recon[hidden], target[hidden], atol=1e-3)


def test_mae_reconstruction_keeps_the_visible_patches_and_fills_the_hidden_ones():
    from bench.methods.mae3d import MAE3D
    from bench.methods.vit import ViT3D, patchify, unpatchify

    x = torch.rand(2, 1, 32, 32, 32)
    assert torch.equal(unpatchify(patchify(x, 8), 8, (4, 4, 4)), x)
    mae = MAE3D(ViT3D(32, 8, embed_dim=32, depth=1, num_heads=2), 16, 1, 2, mask_ratio=0.75, norm_pix_loss=True).eval()
    torch.manual_seed(0)
    masked, recon = mae.reconstruct(x)
    hidden = (patchify(masked, 8) == 0).all(dim=-1)  # (B, 64) blanked patches
    assert hidden.sum(dim=1).tolist() == [48, 48]  # 75 % of 64
    visible = patchify(recon, 8)[~hidden]
    assert torch.equal(visible, patchify(x, 8)[~hidden])  # visible patches are the input's own
    assert not torch.equal(patchify(recon, 8)[hidden], patchify(x, 8)[hidden])  # hidden ones are predicted


@pytest.mark.parametrize("name", sorted(list_methods()))
def test_every_methods_maps_come_back_to_the_crop(name):
    """Every registered method's maps at tiny: Grad-CAM's layer is one the forward pass calls, and
    every map is finite in the crop's frame (a hook that never fires or an in-place add fails here)."""
    from bench.config import compose
    from bench.explain_maps import maps_of
    from bench.registry import create_method, get_method

    cls = get_method(name)
    cfg = compose({"method": name, "preset": "tiny", "regime": cls.regimes[0]}, cls)
    method = create_method(name, cfg)
    model = method.build_model().eval()
    crop = np.random.default_rng(0).uniform(-1000, 1500, (cfg.crop_size,) * 3).astype(np.float32)
    maps = maps_of(method, cfg, model, crop)
    assert "occlusion" in maps and ("gradcam" in maps or "rollout" in maps)
    for m in maps.values():
        assert m.shape == crop.shape and np.isfinite(m).all() and m.sum() == pytest.approx(1.0, abs=1e-3)


def test_explain_file_names_stay_inside_the_explain_folder():
    """A patient id from the user's data may hold '/' or '..': the file stem is one safe name."""
    from bench.explain_output import file_stem

    stem = file_stem(3, "TP", "../site A/p01", "L1")
    assert "/" not in stem and ".." not in stem and stem.startswith("03_TP_") and stem.endswith("_L1")
