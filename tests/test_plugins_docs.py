"""The plugin examples of docs/plugins.md, as a user meets them: every code block with a file name is
written out, each package is installed with pip (its `bench.methods` entry point included), and
`bench` lists and runs the methods in fresh processes at `preset=tiny`."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests_helpers import REPO, run_cli, run_cli_fresh

PAGE = REPO / "docs" / "plugins.md"
BLOCK = re.compile(r'^```(?:python|toml) title="([^"]+)"\n(.*?)^```$', re.MULTILINE | re.DOTALL)
PROJECTS = ("bench-mycnn", "bench-simclr3d", "bench-byol3d")


def documented_files() -> dict[str, str]:
    """{path: text} of the page's named code blocks."""
    return dict(BLOCK.findall(PAGE.read_text()))


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    root, site = tmp_path_factory.mktemp("projects"), tmp_path_factory.mktemp("site")
    for path, text in documented_files().items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(site), *(str(root / p) for p in PROJECTS)], check=True, capture_output=True)
    return site


def test_the_page_holds_three_complete_packages():
    files = documented_files()
    assert sorted(files) == sorted(f"{p}/{f}" for p in PROJECTS
                                   for f in ("pyproject.toml", f"{p.replace('-', '_')}/__init__.py"))


@pytest.mark.e2e
def test_documented_plugins_install_list_run_and_report(plugin_site, tmp_path, bench_cache):
    env = {"PYTHONPATH": str(plugin_site)}
    listed = run_cli_fresh("list", "methods", env=env)
    assert listed.returncode == 0 and all(m in listed.stdout for m in ("my_cnn", "simclr3d", "byol3d"))
    out = tmp_path / "runs"
    ran = run_cli_fresh("run", "method=my_cnn", "preset=tiny", "model.width=4", f"out={out}", env=env)
    assert ran.returncode == 0, ran.stderr
    assert (out / "single" / "my_cnn-scratch-s0" / "metrics.json").exists()
    for method in ("simclr3d", "byol3d"):
        ran = run_cli_fresh("run", f"method={method}", "preset=tiny", f"out={out}", env=env)
        assert ran.returncode == 0, ran.stderr
        metrics = json.loads((out / "single" / f"{method}-vertebrae-s0" / "metrics.json").read_text())
        init = metrics["pretraining"]
        assert init["init"].startswith("artifact ") and init["load_report"]["missing"] == []
        artifact = Path(init["artifact"])
        assert artifact.parent.parent == bench_cache / "pretrain" and (artifact / "pretext.safetensors").is_file()
        assert len(init["pretrain_curve"]) == 2 and all(torch.isfinite(torch.tensor(e["loss"]))
                                                         for e in init["pretrain_curve"])
        assert (out / "single" / f"{method}-scratch-s0" / "metrics.json").is_file()
    byol_curve = json.loads((out / "single" / "byol3d-vertebrae-s0" / "metrics.json").read_text())
    assert [e["momentum"] for e in byol_curve["pretraining"]["pretrain_curve"]] == pytest.approx([0.99, 0.995])
    bad = run_cli_fresh("run", "method=my_cnn", "preset=tiny", "model.depth=4", env=env)
    assert bad.returncode == 2 and "unknown config key 'model.depth'" in bad.stderr and "model.width" in bad.stderr
    report = run_cli("report", str(out / "single"), f"out={tmp_path / 'report'}", "bootstrap=20", env=env)
    assert report.returncode == 0, report.stderr
    html = (tmp_path / "report" / "index.html").read_text()
    assert "Other runs" in html and "simclr3d" in html and "byol3d" in html


def _byol(plugin_site):
    sys.path.insert(0, str(plugin_site))
    try:
        import bench_byol3d
    finally:
        sys.path.remove(str(plugin_site))
    from bench.config import compose
    from bench.registry import get_method

    cfg = compose({"method": "byol3d", "preset": "tiny", "regime": "vertebrae"}, get_method("byol3d"))
    return bench_byol3d, get_method("byol3d")(cfg)


def test_byol_teacher_gets_no_gradient_and_moves_by_the_momentum_rule(plugin_site):
    from bench.loop import make_optimizer
    from bench.methods.pretext import cosine_momentum

    _, method = _byol(plugin_site)
    torch.manual_seed(0)
    pretext = method.make_pretext("vertebrae")
    groups = pretext.param_groups()
    trained = {id(p) for g in groups for p in g["params"]}
    assert not any(id(p) in trained for p in pretext.teacher.parameters())
    optimizer = make_optimizer(groups, "adamw", 1e-2, 0.05)
    x = torch.rand(4, 1, 16, 16, 16)
    teacher_before = [t.detach().clone() for t in pretext.teacher.parameters()]
    pretext.train()
    loss = pretext.step(pretext, (x, x.flip(2)))["loss"]
    loss.backward()
    assert all(t.grad is None for t in pretext.teacher.parameters())
    optimizer.step()
    pretext.on_step(3, 10)
    m = cosine_momentum(3, 10, method.params.base_momentum)
    assert 0.99 < m < 1
    student = [p for pair in pretext.teacher_pairs() for p in pair[0].parameters()]
    for before, after, s in zip(teacher_before, pretext.teacher.parameters(), student):
        torch.testing.assert_close(after, m * before + (1 - m) * s.detach())
    assert any(not torch.equal(b, a) for b, a in zip(teacher_before, pretext.teacher.parameters()))


def test_views_are_made_per_sample_from_the_seeded_generator(plugin_site, bench_cache):
    from bench.datasets.pretext import WithViews, pretext_dataset

    _, method = _byol(plugin_site)
    dataset, _ = pretext_dataset(method, method.cfg, "vertebrae", seed=0)
    dataset = WithViews(dataset, method.make_pretext("vertebrae").sample_views, 0)
    a1, b1 = dataset[3]
    a2, b2 = dataset[3]
    assert torch.equal(a1, a2) and torch.equal(b1, b2) and not torch.equal(a1, b1)
    assert a1.shape == dataset.inner[3].shape and 0 <= a1.min() and a1.max() <= 1
    dataset.epoch = 1
    assert not torch.equal(dataset[3][0], a1)


def test_a_pretext_without_an_encoder_is_one_line():
    from torch import nn

    from bench.errors import BenchError
    from bench.methods.pretext import PretextTask

    class Nameless(PretextTask):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(2, 2)

    with pytest.raises(BenchError, match="has no `encoder` module; name the encoder `encoder` or override"):
        Nameless().pretrained_encoder()
