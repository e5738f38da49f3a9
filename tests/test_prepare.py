"""A suite makes the synthetic data its runs read before any trial starts, side by side."""
from bench.prepare import data_jobs, prepare_data
from bench.run import resolve_runs


def _configs(cache, *runs):
    return [cfg for method, regime in runs
            for cfg in resolve_runs({"method": method, "regime": regime, "preset": "tiny", "cache_dir": str(cache)})]


def test_jobs_are_what_the_runs_read_once_each(tmp_path):
    configs = _configs(tmp_path, ("resnet18", "scratch"), ("vit_unetr", "public_to_vertebrae"),
                       ("vit_unetr", "public"), ("video_mae", "public"), ("mae3d", "vertebrae"))
    kinds = sorted(kind for kind, _ in data_jobs(configs).values())
    assert kinds == ["body_ct", "labelled", "unlabelled", "video"]
    assert [k for k, _ in data_jobs(_configs(tmp_path, ("resnet18", "scratch"))).values()] == ["labelled"]
    # at `small` every method sees one crop: swin_unetr shares the labelled set and the video corpus
    at_small = [cfg for m in ("video_mae", "swin_unetr", "mc3_18")
                for cfg in resolve_runs({"method": m, "regime": "public", "cache_dir": str(tmp_path)})]
    assert sorted(k for k, _ in data_jobs(at_small).values()) == ["body_ct", "labelled", "video"]
    with_file = resolve_runs({"method": "vit_unetr", "regime": "public", "preset": "tiny",
                              "weights.public": "/some/file.pt"})
    assert [k for k, _ in data_jobs(with_file).values()] == ["labelled"]  # the real file needs no corpus


def test_prepared_data_is_the_data_the_runs_load(tmp_path):
    from bench.datasets.loading import load_corpus, load_data, load_unlabelled

    configs = _configs(tmp_path, ("vit_unetr", "public_to_vertebrae"), ("video_mae", "public"))
    kinds, _ = prepare_data(configs, workers=2)
    assert sorted(kinds) == ["body_ct", "labelled", "unlabelled", "video"]
    made = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".lock"}
    assert any(p.suffix == ".npy" for p in made)
    cfg = configs[0]
    load_data(cfg), load_unlabelled(cfg), load_corpus(cfg, "body_ct"), load_corpus(configs[1], "video")
    assert {p: p.stat().st_mtime_ns for p in made} == made  # found in the cache, nothing made again
