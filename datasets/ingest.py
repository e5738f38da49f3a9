"""CT + vertebra mask -> one crop per vertebra, centred on its centroid, on an RAS grid in mm.

Why world coordinates: the crop grid is laid out along R, A, S in millimetres around the centroid,
and each grid point is mapped through the CT's inverse affine. Any storage orientation (RAS, PIR,
LPS, ...) and any voxel size therefore give the same anatomical crop, and only the small block of
CT voxels under the crop is read and interpolated, never the whole volume.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from bench.datasets.base import crop_checksum
from bench.datasets.labelmaps import VERTEBRAE, get_label_map
from bench.datasets.nifti import load_volume, same_grid
from bench.errors import BenchError

FRAME = "RAS"  # crop axes: 0 -> patient's right, 1 -> anterior, 2 -> superior
PAD_HU = -1000.0


@dataclass
class IngestOptions:
    label_map: str
    size: int = 96
    spacing: float = 1.0
    max_missing: float = 0.4  # largest fraction of a crop outside the scan that is padded, not skipped
    min_volume_ml: float = 1.0  # mask fragments smaller than this are skipped (a vertebra is 10-70 ml)
    dtype: str = "int16"  # or float16
    order: int = 1  # interpolation order (0 nearest, 1 linear)

    def validate(self) -> None:
        get_label_map(self.label_map)
        if self.size < 8 or self.spacing <= 0:
            raise BenchError(f"bad crop geometry: size={self.size} (>= 8), spacing={self.spacing} (> 0 mm)")
        if not 0 <= self.max_missing < 1:
            raise BenchError(f"bad value for 'max_missing': {self.max_missing}; expected in [0, 1)")
        if self.dtype not in ("int16", "float16"):
            raise BenchError(f"bad value for 'dtype': '{self.dtype}'; valid: float16, int16")
        if self.order not in (0, 1):
            raise BenchError(f"bad value for 'order': {self.order}; valid: 0, 1")


@dataclass
class Case:
    ct: str
    mask: str
    patient_id: str
    centroids: str | None = None  # VerSe centroid JSON (voxel coordinates), optional
    series: str | None = None  # one of several series of this patient (a vertebra seen twice is kept once)
    label_map: str | None = None  # this case's mask ids, where they differ from the ingestion's label_map


@dataclass
class Vertebra:
    name: str
    label_id: int
    voxels: int
    centroid_world: np.ndarray  # RAS mm
    touches_border: bool


MAX_LABELS = 1024  # a segmentation has tens of labels (TotalSegmentator: 117); a CT thousands of values


def check_label_image(mask: np.ndarray, where: str) -> None:
    """A vertebra mask must be an integer label image: whole, finite, non-negative values, and few of
    them. A CT given as its own mask (a copy, another file name) has negative HU and thousands of
    values, and its voxels of 1-25 HU would otherwise be read as vertebrae."""
    if np.issubdtype(mask.dtype, np.floating):
        if not np.isfinite(mask).all() or not np.array_equal(mask, np.round(mask)):
            raise BenchError(f"{where} holds non-integer or non-finite values; expected integer labels")
    low = mask.min() if mask.size else 0
    if low < 0:
        raise BenchError(f"{where} holds negative values (down to {low:g}); a label image has none: is it the CT?")
    sample = np.asarray(mask).ravel(order="K")[:: max(1, mask.size // 2_000_000)]  # memory order: no copy
    count = len(np.unique(sample))
    if count > MAX_LABELS:
        raise BenchError(f"{where} holds {count} distinct values; a label image has at most {MAX_LABELS}: "
                         f"is it the CT?")


def vertebra_centroids(mask: np.ndarray, affine: np.ndarray, label_map: dict[int, str]) -> list[Vertebra]:
    """Centroids of every vertebra label, cranial to caudal; other labels are ignored.

    One pass over the mask finds its labelled voxels (a small share of a CT); everything else is
    computed from those alone. The mask is read in its memory order (nibabel's arrays are Fortran-
    ordered), so the pass makes no copy of it. The mask has passed `check_label_image`.
    """
    ids = np.asarray(mask).astype(np.int32, copy=False) if mask.dtype.kind == "f" else np.asarray(mask)
    order = "F" if ids.flags.f_contiguous and not ids.flags.c_contiguous else "C"
    flat_ids = ids.ravel(order=order)
    where = np.flatnonzero(flat_ids)
    values = flat_ids[where]
    wanted = np.isin(values, list(label_map))
    where, values = where[wanted], values[wanted]
    coords = np.stack(np.unravel_index(where, ids.shape, order=order), axis=1)
    out = []
    for label_id, name in label_map.items():
        voxels = coords[values == label_id]
        if not len(voxels):
            continue
        voxel = voxels.mean(axis=0)
        touches = bool((voxels.min(axis=0) == 0).any() or (voxels.max(axis=0) == np.array(mask.shape) - 1).any())
        out.append(Vertebra(name, label_id, len(voxels), (affine @ np.append(voxel, 1.0))[:3], touches))
    out.sort(key=lambda v: VERTEBRAE.index(v.name))
    return out


def read_verse_centroids(path: str | Path, affine: np.ndarray, shape: tuple[int, ...],
                         label_map: dict[int, str]) -> dict[str, np.ndarray]:
    """VerSe `*_ctd.json`: voxel coordinates in the frame named by its "direction" entry -> RAS mm."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text())
        direction = next(e["direction"] for e in entries if "direction" in e)
        points = {int(e["label"]): np.array([e["X"], e["Y"], e["Z"]], float) for e in entries if "label" in e}
    except (OSError, ValueError, KeyError, StopIteration, TypeError) as exc:
        raise BenchError(f"centroids '{path}': not a VerSe centroid file ({type(exc).__name__}: {exc})") from None
    # JSON voxel frame -> stored voxel frame: the affine nibabel would give the reoriented image
    ornt = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt(tuple(direction))
    )
    json_affine = affine @ nib.orientations.inv_ornt_aff(ornt, shape)
    return {label_map[i]: (json_affine @ np.append(p, 1.0))[:3] for i, p in points.items() if i in label_map}


def sample_crop(ct: np.ndarray, affine: np.ndarray, centre: np.ndarray, size: int, spacing: float,
                order: int = 1) -> tuple[np.ndarray, float]:
    """The float32 (size,)*3 RAS crop around `centre` (mm) and the fraction outside the scan.

    Linear interpolation with the edge voxel repeated (map_coordinates, order 1, mode "nearest").
    A scan whose voxel axes run along R, A and S (in some order and direction, as nearly every CT's
    do) is sampled axis by axis: trilinear interpolation is the product of three linear ones, so
    this gives map_coordinates' values without its per-voxel cost. An oblique scan, or `order` 0,
    takes map_coordinates over the whole grid."""
    offsets = (np.arange(size) - (size - 1) / 2) * spacing
    inv = np.linalg.inv(affine)
    step = inv[:3, :3]  # voxel displacement per mm along R, A, S
    origin = inv[:3, :3] @ centre + inv[:3, 3]
    corners = np.array([[a, b, c] for a in offsets[[0, -1]] for b in offsets[[0, -1]] for c in offsets[[0, -1]]])
    reach = corners @ step.T + origin
    shape = np.array(ct.shape)
    lo = np.clip(np.floor(reach.min(0)).astype(int) - 1, 0, shape)
    hi = np.clip(np.ceil(reach.max(0)).astype(int) + 2, 0, shape)
    block = ct[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    if block.size == 0:
        return np.full((size,) * 3, PAD_HU, np.float32), 1.0
    axes = _axis_aligned(step, offsets) if order == 1 else None
    if axes is not None:  # the voxel coordinate along each voxel axis: a line along the RAS axis it follows
        along = [[-1 if r == axes[d] else 1 for r in range(3)] for d in range(3)]
        coords = [((origin[d] - lo[d]) + step[d, axes[d]] * offsets).reshape(along[d]) for d in range(3)]
    else:  # voxel coordinates of every grid point, built separably (no (3, N) world-point matrix)
        coords = np.empty((3, size, size, size), np.float32)
        for d in range(3):
            coords[d] = (
                (origin[d] - lo[d])
                + step[d, 0] * offsets[:, None, None]
                + step[d, 1] * offsets[None, :, None]
                + step[d, 2] * offsets[None, None, :]
            )
    outside = np.zeros((size,) * 3, bool)
    for d in range(3):
        absolute = coords[d] + lo[d]
        outside |= (absolute < -0.5) | (absolute > shape[d] - 0.5)
    if axes is not None:
        crop = np.array(block, order="K")  # contiguous in the scan's memory order: the gathers below read runs
        for d in range(3):
            crop = _linear_along(crop, coords[d].ravel(), d)
        crop = np.ascontiguousarray(crop.transpose(np.argsort(axes)), dtype=np.float32)
    else:
        crop = ndimage.map_coordinates(block, coords, order=order, mode="nearest", output=np.float32)
    crop[outside] = PAD_HU
    return crop, float(outside.mean())


def _axis_aligned(step: np.ndarray, offsets: np.ndarray, tol_voxels: float = 1e-4) -> np.ndarray | None:
    """For each voxel axis, the one RAS axis it moves along, when every voxel axis moves along one
    (up to `tol_voxels` over the crop: stored affines carry float rounding); None for an oblique scan."""
    axes = np.abs(step).argmax(axis=1)
    if sorted(axes.tolist()) != [0, 1, 2]:
        return None
    across = np.abs(step)
    across[np.arange(3), axes] = 0.0
    return axes if (across.sum(axis=1) * np.abs(offsets).max()).max() <= tol_voxels else None


def _linear_along(x: np.ndarray, positions: np.ndarray, axis: int) -> np.ndarray:
    """`x` linearly interpolated at `positions` (voxel coordinates) along one axis, in float32, the
    edge repeated beyond its ends (map_coordinates' mode "nearest")."""
    n = x.shape[axis]
    positions = np.clip(positions, 0, n - 1)
    low = np.minimum(np.floor(positions).astype(np.intp), max(n - 2, 0))
    weight = (positions - low).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
    below = np.take(x, low, axis=axis).astype(np.float32, copy=False)
    return below + weight * (np.take(x, np.minimum(low + 1, n - 1), axis=axis) - below)


def _read_mask(path: str, label_map: dict[int, str]) -> tuple[np.ndarray, np.ndarray, list[Vertebra]]:
    """The mask, its affine and its vertebrae; a mask that is not a label image is one line."""
    mask, affine = load_volume(path, "mask")
    check_label_image(mask, f"mask '{path}'")
    return mask, affine, vertebra_centroids(mask, affine, label_map)


def ingest_case(case: Case, opts: IngestOptions,
                masks: list[np.ndarray] | None = None) -> tuple[np.ndarray, list[dict[str, Any]], list[dict[str, Any]]]:
    """Crops (n, S, S, S) in the store dtype, their manifest rows, and the skipped vertebrae. Given a
    list as `masks`, each crop's ground truth is appended to it: the centre vertebra's own label,
    sampled on the crop's grid (nearest neighbour), as bit 1 of a uint8 mask."""
    map_name = case.label_map or opts.label_map
    label_map = get_label_map(map_name)
    with ThreadPoolExecutor(max_workers=1) as pool:  # the mask is read and measured while the CT decompresses
        reading = pool.submit(_read_mask, case.mask, label_map)
        ct, ct_affine = load_volume(case.ct, "CT")
        mask, mask_affine, vertebrae = reading.result()
    if not same_grid(ct.shape, ct_affine, mask.shape, mask_affine):
        raise BenchError(
            f"mask '{case.mask}' is not on the CT's grid: shapes {ct.shape} vs {mask.shape}, "
            f"affines differ by {np.abs(ct_affine - mask_affine).max():.3g}; resample the mask to the CT first"
        )
    if not vertebrae:
        present = sorted(int(v) for v in np.unique(mask) if v)[:12]
        raise BenchError(
            f"mask '{case.mask}': no vertebra labels of label map '{map_name}' "
            f"(labels present: {present or 'none, the mask is empty'})"
        )
    given = read_verse_centroids(case.centroids, mask_affine, mask.shape, label_map) if case.centroids else {}
    crops, rows, skipped = [], [], []
    zooms = np.sqrt((ct_affine[:3, :3] ** 2).sum(0))
    voxel_ml = abs(np.linalg.det(mask_affine[:3, :3])) / 1000.0
    for v in vertebrae:
        base = {"patient_id": case.patient_id, "vertebra": v.name, "source": str(case.ct), "voxels": v.voxels}
        if case.series:
            base["series"] = case.series
        volume_ml = v.voxels * voxel_ml
        if volume_ml < opts.min_volume_ml:
            skipped.append({**base, "reason": f"fragment of {volume_ml:.2f} ml (< min_volume_ml={opts.min_volume_ml})"})
            continue
        centre = given.get(v.name, v.centroid_world)
        crop, missing = sample_crop(ct, ct_affine, centre, opts.size, opts.spacing, opts.order)
        if missing > opts.max_missing:
            skipped.append({**base, "missing_fraction": missing,
                            "reason": f"{missing:.0%} of the crop outside the scan (> max_missing={opts.max_missing})"})
            continue
        if opts.dtype == "int16":
            stored = np.clip(np.rint(crop), -32768, 32767).astype(np.int16)
        else:
            stored = crop.astype(np.float16)
        crops.append(stored)
        if masks is not None:
            labels, _ = sample_crop(mask, mask_affine, centre, opts.size, opts.spacing, 0)
            masks.append((np.rint(labels) == v.label_id).astype(np.uint8))
        rows.append({
            **base, "missing_fraction": missing, "touches_border": v.touches_border,
            "centroid_x": float(centre[0]), "centroid_y": float(centre[1]), "centroid_z": float(centre[2]),
            "centroid_source": "json" if v.name in given else "mask",
            "source_spacing": ",".join(f"{z:.3g}" for z in zooms),
            "checksum": crop_checksum(stored),
        })
    empty = np.empty((0,) + (opts.size,) * 3, np.int16 if opts.dtype == "int16" else np.float16)
    return (np.stack(crops) if crops else empty), rows, skipped
