"""`bench report`: paper layout, honest cells, escaping, self-contained HTML, and a real browser."""
import re
import shutil
import subprocess

import pytest
from torch import nn

from bench import register_method
from bench.cli import main
from bench.methods.base import Method


@register_method("<script>")
class ScriptNamed(Method):
    """A method whose name is markup: the report must show it as text."""

    description = "test-only"

    def build_encoder(self):
        return nn.Sequential(nn.Conv3d(1, 4, 3, stride=4), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten()), 4


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    out = tmp_path_factory.mktemp("report-runs")
    for seed in range(3):
        for method in ("_test_tiny_cnn", "<script>"):
            assert main(["run", f"method={method}", "preset=tiny", "epochs=1", f"seed={seed}", f"out={out}"]) == 0
    return out


@pytest.fixture(scope="module")
def html(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    assert main(["report", str(store), f"out={out}", "bootstrap=50"]) == 0
    return (out / "index.html").read_text(), out / "index.html"


def test_cells_are_mean_sd_and_ci_over_seeds(html):
    text, _ = html
    assert "Other runs" in text and "_test_tiny_cnn" in text
    cell = r"<td class=\"(best|notlearned)?\">\d+\.\d ± \d+\.\d<br><span class=\"ci\">\[\d+\.\d, \d+\.\d\]"
    assert re.search(cell, text)
    assert "<td>3<span class=\"sources\">sd: " in text  # three seeds per cell, and what their sd samples


def test_cells_leave_the_html_as_csv_parquet_latex_and_the_api(html, store):
    import pandas as pd

    from bench import results
    from bench.reports.export import _tex

    folder = html[1].parent
    cells = results.cells(folder)
    csv = pd.read_csv(folder / "cells.csv", keep_default_na=False)
    assert list(csv.columns) == list(cells.columns) and list(csv.method) == list(cells.method)
    assert csv[["auc", "auc_lo", "auc_hi", "f1"]].to_numpy().tolist() == \
        cells[["auc", "auc_lo", "auc_hi", "f1"]].to_numpy().tolist()
    assert set(cells.method) == {"_test_tiny_cnn", "<script>"} and set(cells.seeds) == {3}
    assert cells["auc_lo"].le(cells["auc"]).all() and cells["auc"].le(cells["auc_hi"]).all()
    runs = results.runs(store)
    for c in cells.itertuples():  # each cell is the mean over its seeds' runs
        assert abs(c.auc - runs.loc[runs.method == c.method, "auc"].mean()) < 1e-12
    assert len(results.predictions(runs.folder[0])) == runs.n_test[0]
    tex = (folder / "tables.tex").read_text()
    rows = [line for line in tex.splitlines() if line.rstrip().endswith(r"\\") and not line.startswith("Method")]
    assert len(rows) == len(cells) and tex.count(r"\begin{tabular}") == cells.table.nunique()
    for c, line in zip(cells.itertuples(), rows):
        assert _tex(c.method) in line and f"{100 * c.auc:.1f}" in line
    assert r"\toprule" in tex and r"\bottomrule" in tex and r"\textless{}script\textgreater{}" in tex


def test_markup_in_names_is_escaped(html):
    text, _ = html
    assert "&lt;script&gt;" in text and "<script>" not in text


def test_self_contained(html):
    text, _ = html
    assert "data:image/png;base64," in text
    assert not re.search(r"(src|href)=\"(https?:)?//", text)  # nothing fetched from a network


def test_missing_cells_are_missing_not_zero(tmp_path, store):
    # a store with only resnet18 shows Table 4 with every other baseline missing, and the paper's numbers apart
    subset = tmp_path / "subset"
    shutil.copytree(store, subset)
    for folder in (subset / "single").iterdir():
        if folder.name.startswith("_test_tiny_cnn"):
            folder.rename(folder.with_name(folder.name.replace("_test_tiny_cnn", "resnet18")))
    for cfg in (subset / "single").glob("resnet18-*/config.yaml"):
        cfg.write_text(cfg.read_text().replace("method: _test_tiny_cnn", "method: resnet18"))
    assert main(["report", str(subset), f"out={tmp_path / 'rep'}", "bootstrap=20"]) == 0
    text = (tmp_path / "rep" / "index.html").read_text()
    table4 = text[text.index("Table 4"):text.index("Other runs")]
    assert table4.count("missing (not run)") == 7  # 6 baselines + video_ct_mae
    assert '<td class="paper">81.8</td>' in table4  # resnet18's published F1, in its own column group


def test_report_opens_in_headless_chromium(html, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (.ci/run installs it)")
    _, path = html
    shot = tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1600",
                    f"--screenshot={shot}", path.as_uri()], capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 20_000  # a rendered page, not a blank one


def test_provenance_row_of_each_run_shows_its_own_start_time(html, store):
    """Each run's provenance row carries the start time its env.json recorded (not another run's)."""
    import html as html_lib
    import json

    text, _ = html
    rows = {}
    for row in re.findall(r"<tr><td class=\"name\">(.*?)</td>(.*?)</tr>", text):
        rows[html_lib.unescape(row[0])] = row[1]
    folders = [f for f in store.rglob("env.json")]
    assert folders
    for env in folders:
        started = json.loads(env.read_text())["started"]
        assert started in rows[env.parent.name], (env.parent.name, started)
