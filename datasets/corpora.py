"""Out-of-domain corpora for the embedded `public` regime: what "public weights" are pretrained on
when no real checkpoint is given.

- Body-CT patches (for the CT methods: Models Genesis, ViT/Swin UNETR SSL, 3D MAE): cubes from a
  procedural torso in HU, thorax or abdomen: skin, subcutaneous fat, muscle, lungs with vessels,
  liver, spleen, kidneys, bowel gas, ribs and vertebrae, with blur and noise. Self-supervised
  pretexts read the HU alone; the supervised stand-in (SuPreM's organ segmentation) also reads the
  organ label map the generator drew them from (`ORGANS`).
- Video clips (for Video MAE / Video-CT MAE): RGB frames with 2-4 textured objects (stripes,
  checkers, blobs) moving and scaling over a drifting textured background, the role Kinetics plays
  for the public video weights.

Both are deterministic from (seed, index) and cheap enough to generate on first use.
"""
from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

ORGANS = ("background", "liver", "spleen", "kidney_right", "kidney_left", "lung_right", "lung_left", "bowel",
          "vessel", "rib", "vertebra", "aorta")  # label value = index; what is not drawn is background
TISSUE_HU = {"fat": -100.0, "muscle": 50.0, "liver": 60.0, "spleen": 50.0, "kidney": 30.0, "lung": -850.0,
             "air": -1000.0, "gas": -900.0, "bone": 700.0, "vessel": 40.0}


def _ellipsoid(X, Y, Z, c, r, rot: float = 0.0):
    x, y = X - c[0], Y - c[1]
    xr, yr = np.cos(rot) * x - np.sin(rot) * y, np.sin(rot) * x + np.cos(rot) * y
    return (xr / r[0]) ** 2 + (yr / r[1]) ** 2 + ((Z - c[2]) / r[2]) ** 2 < 1


def body_ct_patch(index: int, size: int, fov_mm: float, seed: int,
                  organs: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """One int16 (size,)*3 patch of a procedural torso (RAS order), at fov_mm / size mm voxels;
    with `organs`, also its uint8 label map (values index `ORGANS`, on the unblurred geometry)."""
    label = {name: i for i, name in enumerate(ORGANS)}
    rng = np.random.default_rng([seed, index, 7])
    spacing = fov_mm / size
    axis = ((np.arange(size) - (size - 1) / 2) * spacing).astype(np.float32)
    # the patch sits somewhere inside a torso 300-380 mm wide, 200-260 mm deep
    half_w, half_d = rng.uniform(150, 190), rng.uniform(100, 130)
    cx, cy = rng.uniform(-0.8, 0.8) * half_w, rng.uniform(-0.8, 0.8) * half_d
    X, Y, Z = np.meshgrid(axis + cx, axis + cy, axis + rng.uniform(-100, 100), indexing="ij")
    body = (X / half_w) ** 2 + (Y / half_d) ** 2
    hu = np.full(X.shape, TISSUE_HU["air"], np.float32)
    labels = np.zeros(X.shape, np.uint8)
    hu[body < 1] = TISSUE_HU["fat"]  # subcutaneous fat
    wall = rng.uniform(0.72, 0.85)
    hu[(body < wall) & (body > wall - 0.12)] = TISSUE_HU["muscle"]  # body-wall muscle
    hu[body < wall - 0.12] = TISSUE_HU["fat"] + 20  # visceral fat, filled below
    thorax = rng.random() < 0.5
    if thorax:
        for side in (-1, 1):
            lung = _ellipsoid(X, Y, Z, (side * 0.45 * half_w, 0.05 * half_d, 0), (0.33 * half_w, 0.7 * half_d, 400))
            hu[lung] = TISSUE_HU["lung"] + rng.normal(0, 30)
            labels[lung] = label["lung_right" if side < 0 else "lung_left"]  # RAS: +x is the patient's left
        for _ in range(int(rng.integers(6, 14))):  # vessels: thin tubes in random directions
            p, d = rng.uniform(-60, 60, 3), rng.normal(size=3)
            d /= np.linalg.norm(d)
            rel = np.stack([X - cx - p[0], Y - cy - p[1], Z - p[2]], -1)
            dist = np.linalg.norm(rel - (rel @ d)[..., None] * d, axis=-1)
            vessel = (dist < rng.uniform(1.5, 5)) & (hu < -500)
            hu[vessel] = TISSUE_HU["vessel"]
            labels[vessel] = label["vessel"]
        for _ in range(int(rng.integers(3, 7))):  # ribs: arcs near the body wall
            z0 = rng.uniform(-80, 80)
            ring = np.abs(np.sqrt((X / half_w) ** 2 + (Y / half_d) ** 2) - rng.uniform(0.85, 0.93)) < 0.03
            rib = ring & (np.abs(Z - z0) < rng.uniform(4, 7))
            hu[rib] = TISSUE_HU["bone"] * rng.uniform(0.6, 1.2)
            labels[rib] = label["rib"]
    else:
        solid = [("liver", (-0.35, 0.1), (0.35, 0.5)), ("spleen", (0.5, -0.1), (0.15, 0.25)),
                 ("kidney_right", (-0.35, -0.45), (0.1, 0.18)), ("kidney_left", (0.35, -0.45), (0.1, 0.18))]
        for name, c, r in solid:
            mask = _ellipsoid(X, Y, Z, (c[0] * half_w, c[1] * half_d, rng.uniform(-40, 40)),
                              (r[0] * half_w, r[1] * half_d, rng.uniform(50, 120)), rng.uniform(-0.4, 0.4))
            hu[mask] = TISSUE_HU[name.split("_")[0]] + rng.normal(0, 8)
            labels[mask] = label[name]
        for _ in range(int(rng.integers(15, 30))):  # bowel loops, some with gas
            c = (cx + rng.uniform(-60, 60), cy + rng.uniform(-60, 60), rng.uniform(-60, 60))
            r = rng.uniform(8, 22, 3)
            loop = _ellipsoid(X, Y, Z, c, r)
            hu[loop] = TISSUE_HU["muscle"] - 10
            labels[loop] = label["bowel"]
            hu[_ellipsoid(X, Y, Z, c, r * 0.5)] = TISSUE_HU["gas"] if rng.random() < 0.5 else 20.0
    spine = _ellipsoid(X, Y, Z, (0, -0.55 * half_d, 0), (20, 16, 1000))
    hu[spine] = rng.uniform(150, 280)
    labels[spine] = label["vertebra"]
    aorta = _ellipsoid(X, Y, Z, (-25, -0.55 * half_d + 30, 0), (11, 11, 1000))
    hu[aorta] = rng.choice([40.0, rng.uniform(150, 300)])
    labels[aorta] = label["aorta"]
    hu += gaussian_filter(rng.normal(0, 25, X.shape), 0.8).astype(np.float32)
    hu = gaussian_filter(hu, 0.8 / spacing)
    hu += rng.normal(0, rng.uniform(8, 25), X.shape)
    hu = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    return (hu, labels) if organs else hu


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w, 3) float texture in [0, 1]: stripes, checkers or smooth blobs in random colours."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    kind = rng.integers(3)
    if kind == 0:
        angle, freq = rng.uniform(0, np.pi), rng.uniform(0.15, 0.6)
        pattern = 0.5 + 0.5 * np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy))
    elif kind == 1:
        cell = rng.integers(3, 9)
        pattern = ((xx // cell + yy // cell) % 2).astype(np.float32)
    else:
        pattern = gaussian_filter(rng.random((h, w)), rng.uniform(1.5, 4))
        pattern = (pattern - pattern.min()) / (np.ptp(pattern) + 1e-6)
    a, b = rng.random(3), rng.random(3)
    return a * pattern[..., None] + b * (1 - pattern[..., None])


def video_clip(index: int, frames: int, size: int, seed: int) -> np.ndarray:
    """One uint8 (frames, size, size, 3) clip of moving textured objects over a drifting background."""
    rng = np.random.default_rng([seed, index, 11])
    big = 2 * size
    background = _texture(rng, big, big)
    pan = rng.uniform(-1.5, 1.5, 2)
    objects = []
    for _ in range(int(rng.integers(2, 5))):
        r = rng.uniform(0.12, 0.3) * size
        objects.append({
            "tex": _texture(rng, size, size), "pos": rng.uniform(0.2, 0.8, 2) * size, "vel": rng.uniform(-2.5, 2.5, 2),
            "r": r, "grow": rng.uniform(-0.015, 0.015), "round": rng.random() < 0.5,
        })
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    clip = np.empty((frames, size, size, 3), np.uint8)
    for t in range(frames):
        oy, ox = (np.array([size / 2, size / 2]) + pan * t).astype(int) % size
        frame = background[oy:oy + size, ox:ox + size].copy()
        for o in objects:
            cy, cx = o["pos"] + o["vel"] * t
            r = o["r"] * (1 + o["grow"] * t)
            if o["round"]:
                inside = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
            else:
                inside = (np.abs(yy - cy) < r) & (np.abs(xx - cx) < r * 0.7)
            frame[inside] = o["tex"][inside]
        frame += rng.normal(0, 0.02, frame.shape)
        clip[t] = np.clip(frame * 255, 0, 255).astype(np.uint8)
    return clip
