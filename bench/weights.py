"""Public checkpoints: fetch (path or URL, sha256-checked, cached), load safely, map, report.

Checkpoints from outside are untrusted. They are read with `torch.load(weights_only=True)` (which
refuses any pickled object other than tensors and plain containers, without executing it) or with
safetensors, never with plain pickle. Each method maps its public key layout to its own modules in
its own file (next to the model it serves); this module holds the shared pieces: unwrapping
nested dicts and `module.` prefixes, q/k/v fusion, 3D position-embedding resizing, and the load
report, which is an error when no encoder key matched.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import tempfile
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench.errors import BenchError


@dataclass
class WeightsSpec:
    """Where a method's public weights come from and how their keys map onto its encoder."""

    filename: str
    url: str
    sha256: str  # "" when the publisher gives none; then the file's hash is recorded, not checked
    layout: str  # a short description, for reports
    convert: Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]
    # the checkpoint's contents -> its tensor dict; containers that say where the encoder is (an
    # adaptation plan) read it here, before the tensors are separated from it
    unwrap: Callable[[Any], dict[str, torch.Tensor]] | None = None
    hf_repo: str = ""  # the Hugging Face repository ("owner/name") the file is published in, if any
    hf_file: str = ""  # its path in that repository
    revision: str = "main"  # the repository revision (a commit pins the file)
    licence: str = ""  # as the publisher states it
    trained_on: str = ""  # what data trained the published file

    @property
    def source(self) -> str:
        """Where the published file comes from, as `weights.public` takes it: hf://REPO/FILE@REV, a
        download URL, or "" when the publisher gives no address a download can use."""
        if self.hf_repo:
            return f"hf://{self.hf_repo}/{self.hf_file}@{self.revision}"
        return self.url if self.url.startswith(("http://", "https://")) and " " not in self.url else ""


@dataclass
class LoadReport:
    matched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatched: list[str] = field(default_factory=list)
    source: str = ""

    def summary(self) -> dict[str, Any]:
        return {"source": self.source, "matched": len(self.matched), "missing": self.missing,
                "unexpected": self.unexpected, "ignored_outside_encoder": len(self.unexpected),
                "shape_mismatched": self.shape_mismatched}


def _inside(module: nn.Module, key: str) -> bool:
    """Whether a tensor name lies inside one of `module`'s submodules (a tensor of the encoder that
    this encoder lacks, such as a layer-scale gamma or an attention norm of another release),
    rather than outside it (a decoder, a head, another network's keys)."""
    names = {name for name, _ in module.named_modules() if name}
    parts = key.split(".")
    return any(".".join(parts[:i]) in names for i in range(1, len(parts)))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def parse_hf(address: str) -> tuple[str, str, str]:
    """hf://OWNER/NAME/PATH/IN/REPO[@REVISION] -> (repository, file, revision)."""
    head, _, last = address[len("hf://"):].rpartition("/")
    last, _, revision = last.partition("@")
    parts = [p for p in f"{head}/{last}".split("/") if p]
    if len(parts) < 3 or any(p in (".", "..") for p in parts):
        raise BenchError(f"weights '{address}': expected hf://OWNER/NAME/FILE[@REVISION]")
    return "/".join(parts[:2]), "/".join(parts[2:]), revision or "main"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def find_downloaded(address: str, weights_dir: str) -> Path | None:
    """A file already downloaded into `weights_dir` (clusters without internet): DIR/NAME/FILE (as
    `hf download REPO FILE --local-dir DIR/NAME` leaves it), DIR/FILE, or Hugging Face's cache
    layout under DIR; for a URL, DIR/<its file name>."""
    if not weights_dir:
        return None
    root = Path(weights_dir).expanduser()
    if not root.is_dir():
        raise BenchError(f"bad value for 'weights.dir': '{weights_dir}' is not a folder")
    if address.startswith("hf://"):
        repo, file, revision = parse_hf(address)
        for candidate in (root / repo.split("/")[1] / file, root / file):
            if candidate.is_file():
                return candidate
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo, file, cache_dir=str(root), revision=revision)
        return Path(cached) if isinstance(cached, str) else None
    name = Path(urllib.parse.unquote(urllib.parse.urlparse(address).path)).name
    return root / name if name and (root / name).is_file() else None


def _fetch_hf(address: str, sha256: str, cache: Path) -> Path:
    """The file of an hf:// address through huggingface_hub, into `cache` (its own cache layout):
    HF_ENDPOINT (a mirror), HF_HUB_OFFLINE (cache only) and HF_TOKEN (gated repositories) apply."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError

    repo, file, revision = parse_hf(address)
    try:
        path = Path(hf_hub_download(repo, file, revision=revision, cache_dir=str(cache / "hf"),
                                    endpoint=os.environ.get("HF_ENDPOINT") or None, local_files_only=_offline()))
    except GatedRepoError:
        raise BenchError(f"weights '{address}': the repository is gated; accept its terms on Hugging Face and set "
                         "HF_TOKEN (or run `hf auth login`)") from None
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if _offline() else "the Hub could not be reached"
        raise BenchError(f"weights '{address}': not downloaded yet and {why}; run `bench weights fetch` where there "
                         "is a connection, or pass weights.dir=DIR with the file in it") from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BenchError(f"weights '{address}': download failed ({first[:200]})") from None
    _check_sha(path, sha256, address)
    return path


def url_target(url: str, sha256: str, cache: Path) -> Path:
    """Where a download of `url` is kept in `cache`: a folder per sha256 (or per URL), the file's name."""
    name = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name or "weights"
    return cache / (sha256[:16] if sha256 else hashlib.sha256(url.encode()).hexdigest()[:16]) / name


def fetch(path_or_url: str, sha256: str, cache: Path, weights_dir: str = "") -> Path:
    """A local file for `path_or_url`; URLs and hf:// addresses are downloaded once into `cache`,
    unless `weights_dir` holds the file already. A given sha256 must match. A file:// URL is a local
    file: read where it is, never copied, so a file fixed in place is what the next run reads."""
    found = find_downloaded(path_or_url, weights_dir) if "://" in path_or_url else None
    if found is not None:
        _check_sha(found, sha256, str(found))
        return found
    if path_or_url.startswith("hf://"):
        return _fetch_hf(path_or_url, sha256, cache)
    parsed = urllib.parse.urlparse(path_or_url)
    if parsed.scheme == "file":
        path_or_url = urllib.request.url2pathname(parsed.path)
        parsed = urllib.parse.urlparse("")
    if parsed.scheme in ("http", "https", "ftp"):
        target = url_target(path_or_url, sha256, cache)
        name = target.name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{name}.")
            try:
                with os.fdopen(fd, "wb") as out, urllib.request.urlopen(path_or_url, timeout=60) as src:
                    shutil.copyfileobj(src, out)
                _check_sha(Path(tmp), sha256, path_or_url)
                os.replace(tmp, target)
            except OSError as exc:
                raise BenchError(f"weights '{path_or_url}': download failed ({exc})") from None
            finally:
                Path(tmp).unlink(missing_ok=True)
        path = target
    else:
        path = Path(path_or_url)
        if not path.is_file():
            raise BenchError(f"weights '{path_or_url}': no such file")
    _check_sha(path, sha256, path_or_url)
    return path


def _check_sha(path: Path, sha256: str, name: str) -> None:
    if sha256:
        actual = sha256_of(path)
        if actual != sha256.lower():
            raise BenchError(f"weights '{name}': sha256 {actual} does not match the expected {sha256}")


def numpy_array_globals() -> list[Any]:
    """What unpickling a numeric numpy array needs (training checkpoints keep numpy's RNG state beside
    the weights): the array type, the array and scalar reconstructors and the numeric dtypes. These rebuild data from
    bytes and call nothing else; an array of Python objects still needs further globals, which stay
    refused."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    numeric = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
               np.float16, np.float32, np.float64)
    rebuild = [core.multiarray._reconstruct, core.multiarray.scalar]
    return [np.ndarray, np.dtype, *rebuild, *(type(np.dtype(t)) for t in numeric)]


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's contents, safely: safetensors, or torch.load with weights_only=True."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise BenchError(f"weights '{path}': not a readable safetensors file ({exc})") from None
    with open(path, "rb") as fh:
        head = fh.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch.save's zip archive, or a pickle
        raise BenchError(f"weights '{path}': not a checkpoint (neither a torch.save archive nor a pickle nor "
                         f"safetensors; it starts with {head!r})")
    try:
        # torch warns about pickle protocols before it refuses: the line below says it
        with warnings.catch_warnings(), torch.serialization.safe_globals(numpy_array_globals()):
            warnings.simplefilter("ignore")
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        why = next((line for line in lines if "Unsupported" in line or "GLOBAL" in line), lines[0])
        raise BenchError(
            f"weights '{path}': refused, the checkpoint holds pickled objects other than tensors "
            f"({why[:160]}); it was not executed"
        ) from None
    except Exception as exc:  # noqa: BLE001 (a malformed pickle stream raises KeyError, IndexError, ...; Ctrl-C is not one)
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise BenchError(f"weights '{path}': not a readable checkpoint ({type(exc).__name__}: {first})") from None


def unwrap_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """Find the tensor dict inside common wrappers and drop `module.` (DataParallel) prefixes."""
    for key in ("state_dict", "model_state", "model", "state_dict_ema", "module", "net"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BenchError("checkpoint holds no tensor dict (looked at the top level and under state_dict, "
                         "model_state, model, state_dict_ema, module, net)")
    out = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue
        while key.startswith("module."):
            key = key[len("module."):]
        out[key] = value
    return out


def fuse_qkv(state: dict[str, torch.Tensor], prefix_pattern: str = ".attn.") -> dict[str, torch.Tensor]:
    """Separate `...attn.q/k/v.{weight,bias}` -> fused `...attn.qkv.{weight,bias}` (timm layout)."""
    out = dict(state)
    for key in [k for k in state if f"{prefix_pattern}q.weight" in k or f"{prefix_pattern}q.bias" in k]:
        kind = key.rsplit(".", 1)[1]
        base = key[: -len(f"q.{kind}")]
        parts = [state.get(f"{base}{n}.{kind}") for n in "qkv"]
        if any(p is None for p in parts):
            continue
        out[f"{base}qkv.{kind}"] = torch.cat(parts, dim=0)
        for n in "qkv":
            del out[f"{base}{n}.{kind}"]
    return out


def resize_pos_embed_3d(pos: torch.Tensor, new_grid: tuple[int, int, int], prefix_tokens: int = 0) -> torch.Tensor:
    """(1, P + g^3, C) position embeddings interpolated (trilinear) to a new 3D token grid."""
    prefix, grid = pos[:, :prefix_tokens], pos[:, prefix_tokens:]
    n, c = grid.shape[1], grid.shape[2]
    side = round(n ** (1 / 3))
    if side**3 != n:
        raise BenchError(f"position embedding with {n} tokens is not a cubic grid")
    if (side,) * 3 == tuple(new_grid):
        return pos
    volume = grid.reshape(1, side, side, side, c).permute(0, 4, 1, 2, 3)
    volume = F.interpolate(volume.float(), size=new_grid, mode="trilinear", align_corners=False)
    return torch.cat([prefix, volume.permute(0, 2, 3, 4, 1).reshape(1, -1, c).to(pos.dtype)], dim=1)


def load_into(module: nn.Module, state: dict[str, torch.Tensor], source: str,
              optional: tuple[str, ...] = (), what: str = "encoder") -> LoadReport:
    """Copy the tensors into `module`: every one of its tensors must come from `state` by name and
    shape, except the `optional` keys (left at their initialisation); anything less is one error
    line listing what did not match, and nothing is loaded. Keys of `state` the module does not
    have are of two kinds: outside the encoder (decoders, heads) they are listed as ignored; inside
    one of its submodules they are encoder tensors this encoder was built without (another release's
    options), and the load fails with a line naming them."""
    own = module.state_dict()
    report = LoadReport(source=source)
    accepted, misshapen, foreign = {}, set(), []
    for key, value in state.items():
        if key not in own:
            if key.endswith("num_batches_tracked"):
                continue
            (foreign if _inside(module, key) else report.unexpected).append(key)
        elif own[key].shape != value.shape:
            report.shape_mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}")
            misshapen.add(key)
        else:
            accepted[key] = value
            report.matched.append(key)
    report.missing = [k for k in own if k not in accepted and not k.endswith("num_batches_tracked")]
    required = [k for k in report.missing if k not in optional and k not in misshapen]  # optional: listed, allowed
    if not report.matched and not report.shape_mismatched:
        sample = ", ".join(list(state)[:3])
        raise BenchError(f"weights '{source}': no {what} key matched (checkpoint keys look like: {sample}); "
                         f"wrong architecture or layout")
    if foreign:
        shown = ", ".join(foreign[:6]) + (f", ... ({len(foreign)} in all)" if len(foreign) > 6 else "")
        raise BenchError(f"weights '{source}': {len(foreign)} tensors of the file's {what} are not in the {what} "
                         f"built here (another architecture option or release?): {shown}")
    if required or report.shape_mismatched:
        bad = [f"{k} (missing)" for k in required] + report.shape_mismatched
        shown = ", ".join(bad[:6]) + (f", ... ({len(bad)} in all)" if len(bad) > 6 else "")
        matched = [k for k in report.matched if not k.endswith("num_batches_tracked")]
        total = len(matched) + len(required) + len(misshapen)
        raise BenchError(f"weights '{source}': {len(matched)} of {total} {what} tensors matched by name and "
                         f"shape; not matched: {shown}")
    broken = [k for k, v in accepted.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise BenchError(f"weights '{source}': {len(broken)} {what} tensors hold NaN or Inf (e.g. {broken[0]}); the "
                         f"file is damaged or was saved from a diverged run")
    module.load_state_dict(accepted, strict=False)
    return report
