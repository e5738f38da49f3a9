"""What `bench explain` writes: per vertebra a PNG of three orthogonal mid-slices (a row per map, the
body and deformity outlined) and each map as NIfTI in the crop's frame; the MAE reconstructions;
and the reading of a run's `explain/explain.json`."""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def crop_affine(shape: tuple[int, ...], spacing: float | tuple[float, ...]) -> np.ndarray:
    """RAS mm of a crop's voxels: `spacing` (one for all axes, or one per axis), the crop's centre at
    the origin."""
    zooms = np.broadcast_to(np.asarray(spacing, dtype=float), (3,))
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = -zooms * (np.array(shape) - 1) / 2
    return affine


def _mid_slice_grid(path: Path, shape: tuple[int, ...], rows: dict[str, Callable[[Any, tuple], None]]) -> None:
    """A PNG of the three orthogonal mid-slices, one row per entry; `draw(ax, index)` paints a row's slice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centre = [s // 2 for s in shape]
    fig, axes = plt.subplots(len(rows), 3, figsize=(6, 2 * len(rows)), squeeze=False)
    for r, (name, draw) in enumerate(rows.items()):
        for c, title in enumerate(("sagittal", "coronal", "axial")):
            index = [slice(None)] * 3
            index[c] = centre[c]
            ax = axes[r, c]
            draw(ax, tuple(index))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=8)
        axes[r, 0].set_ylabel(name, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=60)
    plt.close(fig)


def write_reconstruction(stage: Path, stem: str, original: np.ndarray, masked: np.ndarray,
                          recon: np.ndarray, spacing: tuple[float, ...]) -> dict[str, str]:
    """Original / masked / reconstruction, three orthogonal mid-slices each, and the reconstruction as
    NIfTI spanning the crop (`spacing`: the shown voxels' size on each axis)."""
    import nibabel as nib

    nib.save(nib.Nifti1Image(recon.astype(np.float32), crop_affine(recon.shape, spacing)),
             stage / f"{stem}_mae_reconstruction.nii.gz")

    def gray(volume: np.ndarray) -> Callable[[Any, tuple], None]:
        return lambda ax, index: ax.imshow(np.rot90(volume[index]), cmap="gray", vmin=0.0, vmax=1.0)

    _mid_slice_grid(stage / f"{stem}_mae.png", original.shape,
                    {"original": gray(original), "masked": gray(masked), "reconstruction": gray(recon)})
    return {"mae_png": f"{stem}_mae.png", "mae_reconstruction": f"{stem}_mae_reconstruction.nii.gz"}


def write_outputs(stage: Path, stem: str, crop: np.ndarray, truth: np.ndarray | None,
                   maps: dict[str, np.ndarray], spacing: float) -> dict[str, str]:
    """A PNG (three orthogonal mid-slices, a row per map, the body outlined) and a NIfTI per map."""
    import nibabel as nib

    files, affine = {}, crop_affine(crop.shape, spacing)
    for name, m in maps.items():
        nib.save(nib.Nifti1Image(m.astype(np.float32), affine), stage / f"{stem}_{name}.nii.gz")
        files[name] = f"{stem}_{name}.nii.gz"
    image = np.clip(crop.astype(np.float32), -200, 1200)

    def overlay(m: np.ndarray) -> Callable[[Any, tuple], None]:
        def draw(ax: Any, index: tuple) -> None:
            ax.imshow(np.rot90(image[index]), cmap="gray")
            ax.imshow(np.rot90(m[index]), cmap="inferno", alpha=0.45)
            if truth is not None:
                ax.contour(np.rot90((truth[index] & 1) > 0), levels=[0.5], colors="cyan", linewidths=0.6)
                if (truth & 2).any():
                    ax.contour(np.rot90((truth[index] & 2) > 0), levels=[0.5], colors="lime", linewidths=0.6)
        return draw

    _mid_slice_grid(stage / f"{stem}.png", crop.shape, {name: overlay(m) for name, m in maps.items()})
    files["png"] = f"{stem}.png"
    return files


def file_stem(index: int, kind: str, patient_id: Any, vertebra: Any) -> str:
    """One file name for an explained vertebra: patient ids come from the user's data and may hold
    '/', '..' or spaces, so everything but a safe set of characters becomes '_'."""
    return re.sub(r"[^A-Za-z0-9_.+=-]", "_", f"{index:02d}_{kind}_{patient_id}_{vertebra}").replace("..", "__")


def read_explanations(folder: Path) -> dict[str, Any] | None:
    file = folder / "explain" / "explain.json"
    return json.loads(file.read_text()) if file.is_file() else None
