"""`bench weights fetch`, `weights.public=published`, `weights.dir` and hf:// addresses, against a
local Hugging Face endpoint (HF_ENDPOINT) that serves files in their publishers' layouts (VoCo's, and
those of the other families on the Hub)."""
import hashlib
import http.server
import json
import threading
from pathlib import Path

import pytest
import torch

from bench.cli import main
from bench.config import compose
from bench.errors import BenchError
from bench.registry import create_method, get_method
from bench.weights import fetch, parse_hf
from tests_helpers import randomised

REPO, FILE = "Luffy503/VoCo", "VoCo_B_SSL_head.pt"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _voco_file_at_tiny(path: Path) -> dict[str, torch.Tensor]:
    """VoCo's final-model layout (`module.` + `swin_vit.`, decoder beside it) at the tiny preset's size."""
    cfg = compose({"method": "voco", "preset": "tiny", "regime": "public"}, get_method("voco"))
    method = create_method("voco", cfg)
    encoder = randomised(method.finetune_encoder(method.build_model()).state_dict())
    published = {f"module.swin_vit.{k}": v for k, v in encoder.items()}
    published["module.decoder1.layer.conv1.conv.weight"] = torch.zeros(4, 4)
    torch.save({"state_dict": published}, path)
    return encoder


class _Hub(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    gated: set[str] = set()
    requests: list[str] = []

    def _answer(self, body: bool) -> None:
        self.requests.append(f"{self.command} {self.path}")
        parts = self.path.split("?")[0].strip("/").split("/")  # OWNER/NAME/resolve/REVISION/FILE...
        name = "/".join([*parts[:2], *parts[4:]]) if len(parts) > 4 and parts[2] == "resolve" else ""
        if name in self.gated:
            self.send_response(401)
            self.send_header("X-Error-Code", "GatedRepo")
            self.send_header("X-Error-Message", "Access to this repository is restricted.")
            self.end_headers()
            return
        if name not in self.files:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.end_headers()
            return
        data = self.files[name]
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("X-Repo-Commit", COMMIT)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_HEAD(self):  # noqa: N802 (http.server's naming)
        self._answer(body=False)

    def do_GET(self):  # noqa: N802
        self._answer(body=True)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hub")
    encoder = _voco_file_at_tiny(folder / FILE)
    _Hub.files = {f"{REPO}/{FILE}": (folder / FILE).read_bytes()}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {"endpoint": f"http://127.0.0.1:{server.server_port}", "encoder": encoder,
           "sha256": hashlib.sha256(_Hub.files[f"{REPO}/{FILE}"]).hexdigest(), "file": folder / FILE}
    server.shutdown()


def test_hf_addresses_parse_with_and_without_a_revision():
    assert parse_hf(f"hf://{REPO}/{FILE}") == (REPO, FILE, "main")
    assert parse_hf("hf://a/b/sub/dir/x.pt@v1.0") == ("a/b", "sub/dir/x.pt", "v1.0")
    with pytest.raises(BenchError, match="expected hf://OWNER/NAME/FILE"):
        parse_hf("hf://a/b")


def test_fetch_downloads_once_then_works_offline(hub, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_ENDPOINT", hub["endpoint"])
    cache = tmp_path / "cache"
    assert main(["weights", "fetch", "methods=voco", f"cache_dir={cache}"]) == 0
    out = capsys.readouterr().out
    assert f"voco: hf://{REPO}/{FILE}@main -> " in out
    listed = {json.loads(line)["method"]: json.loads(line) for line in _list(cache, capsys)}
    assert listed["voco"]["cached"] and Path(listed["voco"]["cached"]).read_bytes() == hub["file"].read_bytes()
    assert listed["voco"]["source"] == f"hf://{REPO}/{FILE}@main" and listed["ctfm"]["cached"] is False
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: the cache must answer
    path = fetch(f"hf://{REPO}/{FILE}", "", cache / "weights")
    assert path.read_bytes() == hub["file"].read_bytes()


def _list(cache: Path, capsys) -> list[str]:
    assert main(["weights", "list", f"cache_dir={cache}"]) == 0
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_a_wrong_sha256_gated_or_missing_file_is_one_line(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub["endpoint"])
    with pytest.raises(BenchError, match=r"sha256 [0-9a-f]{64} does not match the expected 00"):
        fetch(f"hf://{REPO}/{FILE}", "00" * 32, tmp_path)
    with pytest.raises(BenchError, match="download failed"):
        fetch(f"hf://{REPO}/absent.pt", "", tmp_path)
    _Hub.gated.add(f"{REPO}/gated.pt")
    with pytest.raises(BenchError, match="gated; accept its terms on Hugging Face and set HF_TOKEN"):
        fetch(f"hf://{REPO}/gated.pt", "", tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BenchError, match="not downloaded yet and HF_HUB_OFFLINE is set"):
        fetch(f"hf://{REPO}/other.pt", "", tmp_path)


def test_weights_dir_finds_a_file_by_its_published_name_without_the_hub(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "VoCo").mkdir()
    (tmp_path / "VoCo" / FILE).write_bytes(hub["file"].read_bytes())
    assert fetch(f"hf://{REPO}/{FILE}", "", tmp_path / "cache", str(tmp_path)) == tmp_path / "VoCo" / FILE
    with pytest.raises(BenchError, match="'weights.dir': '.*nowhere' is not a folder"):
        fetch(f"hf://{REPO}/{FILE}", "", tmp_path / "cache", str(tmp_path / "nowhere"))


def test_published_resolves_to_the_methods_address_or_the_stand_in():
    cfg = compose({"method": "voco", "preset": "tiny", "weights.public": "published"}, get_method("voco"))
    assert cfg.weights.public == f"hf://{REPO}/{FILE}@main"
    cfg = compose({"method": "mae3d", "preset": "tiny", "weights.public": "published"}, get_method("mae3d"))
    assert cfg.weights.public == ""  # no published file: the embedded stand-in


def test_a_run_with_published_weights_loads_them_and_the_report_says_so(hub, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_ENDPOINT", hub["endpoint"])
    runs = tmp_path / "runs"
    assert main(["run", "method=voco", "regime=public", "preset=tiny", "protocol=linear", "weights.public=published",
                 f"out={runs}"]) == 0
    metrics = json.loads(next(runs.rglob("metrics.json")).read_text())
    init = metrics["pretraining"]
    assert init["public_file_sha256"] == hub["sha256"]
    assert init["load_report"]["matched"] == len(hub["encoder"]) and init["load_report"]["ignored_outside_encoder"] == 1
    capsys.readouterr()
    assert main(["report", str(runs), f"out={tmp_path / 'report'}", "bootstrap=20"]) == 0
    html = (tmp_path / "report" / "index.html").read_text()
    assert f"public stage: real file, sha256 {hub['sha256'][:12]}" in html


def _published_at_tiny(name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The tiny encoder's tensors under the names the family's published file uses, and the file's
    tensors outside the encoder (heads, text towers) as its publisher's code writes them."""
    cfg = compose({"method": name, "preset": "tiny", "regime": "public"}, get_method(name))
    method = create_method(name, cfg)
    encoder = randomised(method.finetune_encoder(method.build_model()).state_dict())
    if name == "merlin":  # MerlinArchitecture's whole state dict: the image tower, its heads, the text tower
        return encoder, {**{f"encode_image.i3_resnet.{k}": v for k, v in encoder.items()},
                         "encode_image.i3_resnet.classifier.weight": torch.randn(1692, 32, 1, 1, 1),
                         "encode_image.i3_resnet.classifier.bias": torch.randn(1692),
                         "encode_text.linear_layer.weight": torch.randn(512, 768), "logit_scale": torch.ones(())}
    return encoder, dict(encoder)  # SPECTRE's backbone file and CT-FM's Hub safetensors: the encoder's own keys


@pytest.mark.parametrize("name", ["merlin", "spectre", "ctfm"])
def test_weights_check_reads_each_hub_family_from_its_address(hub, tmp_path, monkeypatch, capsys, name):
    spec = get_method(name).public_weights
    encoder, published = _published_at_tiny(name)
    path = tmp_path / spec.hf_file
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in published.items()}, str(path))
    else:
        torch.save(published, path)
    _Hub.files[f"{spec.hf_repo}/{spec.hf_file}"] = path.read_bytes()
    monkeypatch.setenv("HF_ENDPOINT", hub["endpoint"])
    capsys.readouterr()
    address = f"hf://{spec.hf_repo}/{spec.hf_file}"
    assert main(["weights", "check", address, f"method={name}", "preset=tiny", f"cache_dir={tmp_path / 'c'}"]) == 0
    out = capsys.readouterr().out
    assert f"{len(encoder)} of {len(encoder)} encoder tensors loaded" in out, out
    assert f"{len(published) - len(encoder)} tensors outside the encoder ignored" in out, out
