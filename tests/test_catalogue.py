"""`bench list methods` answers from a cached catalogue, without importing torch, and the
catalogue follows every change of the methods it lists."""
from __future__ import annotations

import os
import subprocess
import sys

from tests_helpers import REPO

LIST_WITHOUT_TORCH = (
    "import sys; from bench.cli import main; main(['list', 'methods']); "
    "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')"
)


def _list(env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-c", LIST_WITHOUT_TORCH], capture_output=True, text=True,
                          env={**os.environ, **env}, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_listing_reads_the_catalogue_and_follows_changes(tmp_path):
    env = {"BENCH_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(tmp_path / "site")}
    plugin = tmp_path / "site" / "my_listed_plugin.py"
    plugin.parent.mkdir()
    first = _list(env)
    assert "video_ct_mae" in first and first.strip().endswith("TORCH")  # built once from the registry
    second = _list(env)
    assert second.replace("NO-TORCH", "TORCH") == first and second.strip().endswith("NO-TORCH")

    # a new plugin (an entry point and its module) changes the fingerprint: listed at once
    plugin.write_text(
        "from bench import register_method\nfrom bench.methods.base import Method\n\n"
        "@register_method('listed_plugin')\nclass Listed(Method):\n    description = 'first words'\n")
    dist = tmp_path / "site" / "my_listed_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-listed-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[bench.methods]\nlisted_plugin = my_listed_plugin\n")
    assert "first words" in _list(env)
    plugin.write_text(plugin.read_text().replace("first words", "second words"))  # an edit of its source
    assert "second words" in _list(env)
