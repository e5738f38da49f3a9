"""A method from a separately installed package joins the registry through its entry point."""
import subprocess
import sys
import textwrap

from tests_helpers import run_cli_fresh as run_cli

PLUGIN = '''
from dataclasses import dataclass
from torch import nn
from bench import register_method
from bench.methods.base import Method


@register_method("tiny_plugin_cnn")
class TinyPluginCNN(Method):
    description = "a two-layer 3D CNN shipped by a third-party package"

    @dataclass
    class Params:
        width: int = 8

    def build_encoder(self):
        w = self.params.width
        net = nn.Sequential(nn.Conv3d(1, w, 3, stride=2, padding=1), nn.ReLU(),
                            nn.Conv3d(w, w, 3, stride=2, padding=1), nn.ReLU(),
                            nn.AdaptiveAvgPool3d(1), nn.Flatten())
        return net, w
'''


def test_entry_point_plugin_lists_and_runs(tmp_path):
    pkg = tmp_path / "src"
    (pkg / "bench_tiny_plugin").mkdir(parents=True)
    (pkg / "bench_tiny_plugin" / "__init__.py").write_text(PLUGIN)
    (pkg / "pyproject.toml").write_text(textwrap.dedent('''
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "bench-tiny-plugin"
        version = "0.0.1"
        [project.entry-points."bench.methods"]
        tiny_plugin_cnn = "bench_tiny_plugin"
        [tool.setuptools]
        packages = ["bench_tiny_plugin"]
    '''))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(pkg)], check=True, capture_output=True)
    env = {"PYTHONPATH": str(site)}

    listed = run_cli("list", "methods", env=env)
    assert listed.returncode == 0 and "tiny_plugin_cnn" in listed.stdout
    assert "third-party" in listed.stdout

    out = tmp_path / "runs"
    ran = run_cli("run", "method=tiny_plugin_cnn", "preset=tiny", "model.width=4", f"out={out}", env=env)
    assert ran.returncode == 0, ran.stderr
    assert (out / "single" / "tiny_plugin_cnn-scratch-s0" / "metrics.json").exists()

    bad = run_cli("run", "method=tiny_plugin_cnn", "preset=tiny", "model.depth=4", env=env)
    assert bad.returncode == 2 and "unknown config key 'model.depth'" in bad.stderr and "model.width" in bad.stderr
