"""Synthetic vertebra phantoms: the embedded default data set (`data=synthetic`).

Each patient is a short spine (consecutive vertebrae from T8 to L5, with unlabelled neighbours at
both ends) with patient-level traits: body size, bone density (osteoporotic patients fracture ~3x
more often, as in reality), scanner noise and blur. Each labelled vertebra gives one crop centred
on its centroid, covering `fov_mm` in every direction, so the crop also holds parts of the adjacent
vertebrae and discs, paraspinal muscles, psoas, aorta and fat.

Anatomy (typical adult values from ../shared/reference/METHODS.md, all varied): elliptic vertebral
bodies with a partial-volumed cortical shell (700-1500 HU) around trabecular bone (150-300 HU,
<110 when osteoporotic) and slightly concave endplates; pedicles, lamina, spinous and transverse
processes; spinal canal with CSF; discs (70-110 HU). Normal variation that must not look like a
fracture: physiologic wedging at T11-L1 (up to ~12 % anterior), endplate degeneration, osteophytes,
small rotations, centroid jitter.

Fractures follow the Genant semi-quantitative scale: grade 1 (20-25 % height loss), 2 (25-40 %),
3 (>40 %), with wedge (anterior), biconcave (middle) or crush (all heights) morphology, irregular
endplates and a sclerotic band near the collapse. The label is `grade >= 1`.

Arrays are (x, y, z) in RAS order: x -> patient's right, y -> anterior, z -> superior; int16 HU.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.ndimage import gaussian_filter

log = logging.getLogger(__name__)

GENERATOR_VERSION = 3  # 3: stores carry ground-truth masks (the crops are those of 2)
LEVELS = [f"T{i}" for i in range(1, 13)] + [f"L{i}" for i in range(1, 6)]
FIRST_LABELLED = LEVELS.index("T8")  # labelled sequences start at T8 or below
GRADE_PROBS_EASY = (0.35, 0.40, 0.25)  # among fractures: mild, moderate, severe (difficulty 0)
GRADE_PROBS_HARD = (0.55, 0.33, 0.12)  # difficulty 1: mostly mild, subtle fractures
GRADE_LOSS = {1: (0.20, 0.25), 2: (0.25, 0.40), 3: (0.40, 0.60)}
MORPHOLOGIES = ("wedge", "biconcave", "crush")
MORPHOLOGY_PROBS = (0.5, 0.3, 0.2)
OSTEOPOROSIS_RATE = 0.35
OSTEOPOROSIS_RISK = 3.0  # relative fracture risk of an osteoporotic patient


@dataclass
class Vertebra:
    """Shape and density of one vertebra, in mm and HU, in its own frame (body centre at origin)."""

    level: str
    height: float  # nominal (posterior) body height
    width: float
    depth: float
    disc_below: float  # thickness of the disc under this vertebra
    trabecular_hu: float
    cortical_hu: float
    shell_mm: float
    loss_anterior: float  # relative height losses, 0 = intact
    loss_middle: float
    loss_posterior: float
    grade: int
    morphology: str
    tilt_deg: float  # sagittal tilt (lordosis / kyphosis)
    endplate_irregularity: float  # mm of bumpy endplate (degeneration or fracture)
    osteophyte_mm: float
    sclerosis_hu: float  # dense band under a collapsed endplate (0: none)
    canal_radius: float
    transverse_reach: float  # lateral reach of transverse processes from the midline

    @property
    def mean_height(self) -> float:
        return self.height * (1 - (self.loss_anterior + self.loss_middle + self.loss_posterior) / 3)


def _level_dims(level: str, scale: float, rng: np.random.Generator) -> tuple[float, float, float]:
    """Body height, width, depth: thoracic bodies are smaller than lumbar ones."""
    t = LEVELS.index(level) / (len(LEVELS) - 1)  # 0 at T1, 1 at L5
    height = (18 + 9 * t) * scale * rng.uniform(0.95, 1.05)
    width = (28 + 18 * t) * scale * rng.uniform(0.93, 1.07)
    depth = (25 + 9 * t) * scale * rng.uniform(0.93, 1.07)
    return height, width, depth


def _draw_vertebra(level: str, patient: dict, fracture_p: float, rng: np.random.Generator) -> Vertebra:
    """One vertebra. `patient["difficulty"]` in [0, 1] makes fractures subtler (more grade 1, fewer and
    fainter sclerotic bands) and normal variation more fracture-like (wedging, endplate dents)."""
    d = patient["difficulty"]
    height, width, depth = _level_dims(level, patient["scale"], rng)
    lumbar = level.startswith("L")
    grade, morphology = 0, "none"
    la = lm = lp = 0.0
    sclerosis = 0.0
    irregular = 0.0
    if rng.random() < fracture_p:
        probs = (1 - d) * np.array(GRADE_PROBS_EASY) + d * np.array(GRADE_PROBS_HARD)
        grade = int(rng.choice([1, 2, 3], p=probs / probs.sum()))
        morphology = str(rng.choice(MORPHOLOGIES, p=MORPHOLOGY_PROBS))
        loss = rng.uniform(*GRADE_LOSS[grade])
        if morphology == "wedge":
            la, lm, lp = loss, loss * rng.uniform(0.3, 0.6), rng.uniform(0.0, 0.05)
        elif morphology == "biconcave":
            la, lm, lp = loss * rng.uniform(0.1, 0.4), loss, rng.uniform(0.0, 0.08)
        else:  # crush: every height, the largest loss anywhere sets the grade
            la, lm, lp = loss, loss * rng.uniform(0.85, 1.0), loss * rng.uniform(0.8, 1.0)
        if rng.random() < 1 - 0.6 * d:
            sclerosis = rng.uniform(150, 350) * (1 - 0.5 * d)
        irregular = rng.uniform(0.8, 2.0) * (1 - 0.4 * d)
    else:
        # Normal variation that is not a fracture, all below the 20 % Genant threshold: physiologic
        # wedging (most at the thoracolumbar junction), mild central dents, Schmorl's-node-like
        # endplate irregularity.
        junction = level in ("T11", "T12", "L1")
        la = rng.uniform(0.0, (0.12 if junction else 0.06) + 0.06 * d)
        lm = rng.uniform(0.0, 0.05 + 0.10 * d)
        lp = rng.uniform(0.0, 0.03)
        if rng.random() < 0.3 * d:
            irregular = rng.uniform(0.5, 1.5)
    degeneration = patient["degeneration"]
    return Vertebra(
        level=level, height=height, width=width, depth=depth,
        disc_below=(rng.uniform(8, 12) if lumbar else rng.uniform(4, 6)) * (1 - 0.4 * degeneration),
        trabecular_hu=patient["trabecular_hu"] + rng.normal(0, 12),
        cortical_hu=rng.uniform(700, 1300),
        shell_mm=rng.uniform(0.6, 1.6),
        loss_anterior=la, loss_middle=lm, loss_posterior=lp,
        grade=grade, morphology=morphology,
        tilt_deg=rng.normal(0, 3),
        endplate_irregularity=irregular + degeneration * rng.uniform(0, 1.2),
        osteophyte_mm=degeneration * rng.uniform(0, 4.0) if rng.random() < degeneration else 0.0,
        sclerosis_hu=sclerosis,
        canal_radius=rng.uniform(7.5, 10.0),
        transverse_reach=(rng.uniform(42, 50) if lumbar else rng.uniform(28, 36)) * patient["scale"],
    )


def draw_patient(index: int, n_vertebrae: int, fracture_rate: float, noise_hu: float, seed: int,
                 difficulty: float = 0.5, prefix: str = "synth") -> dict:
    """A patient's traits and spine (labelled vertebrae plus 2 unlabelled neighbours per side)."""
    rng = np.random.default_rng([seed, index, 0])
    osteoporotic = bool(rng.random() < OSTEOPOROSIS_RATE)
    patient = {
        "patient_id": f"{prefix}{seed:03d}-{index:05d}",
        "index": index,
        "difficulty": difficulty,
        "osteoporotic": osteoporotic,
        "scale": rng.uniform(0.85, 1.12),
        "trabecular_hu": rng.uniform(60, 110) if osteoporotic else rng.uniform(150, 280),
        "degeneration": rng.beta(1.5, 3.0),
        "noise_hu": noise_hu * rng.uniform(0.5, 1.5) * (1 + 0.5 * difficulty),
        "blur_mm": rng.uniform(0.6, 1.0),
        "slice_mm": rng.uniform(0.6, 1.0 + 2.0 * difficulty),  # reconstructed slice thickness (S-I blur)
        "aorta_hu": rng.choice([40.0, rng.uniform(150, 300)]),  # with or without contrast
        "fat_hu": rng.uniform(-120, -80),
    }
    base_p = fracture_rate / (1 + (OSTEOPOROSIS_RISK - 1) * OSTEOPOROSIS_RATE)
    fracture_p = base_p * (OSTEOPOROSIS_RISK if osteoporotic else 1.0)
    first = int(rng.integers(FIRST_LABELLED, len(LEVELS) - n_vertebrae + 1))
    levels = range(first - 2, first + n_vertebrae + 2)
    spine = []
    for i in levels:
        level = LEVELS[i] if 0 <= i < len(LEVELS) else ("S1" if i >= len(LEVELS) else "C7")
        lvl = level if level in LEVELS else ("L5" if level == "S1" else "T1")
        labelled = first <= i < first + n_vertebrae
        vert = _draw_vertebra(lvl, patient, fracture_p if labelled or rng.random() < 0.5 else 0.0, rng)
        vert.level = level
        spine.append((vert, labelled))
    patient["spine"] = spine
    return patient


def _body_field(v: Vertebra, x, y, z, rng: np.random.Generator, spacing: float):
    """Occupancy of the vertebral body and of its cortical shell, plus endplate distance."""
    a, b = v.width / 2, v.depth / 2
    rho = np.sqrt((x / a) ** 2 + (y / b) ** 2)
    yn = np.clip(y / b, -1, 1)  # -1 posterior, +1 anterior
    # heights along the anterior-posterior line, with a central (biconcave) depression
    h_lin = v.height * (1 - (v.loss_posterior + (v.loss_anterior - v.loss_posterior) * (yn + 1) / 2))
    central = np.clip(1 - rho**2, 0, 1)
    mid_extra = max(v.loss_middle - (v.loss_anterior + v.loss_posterior) / 2, 0) * v.height
    concave = 0.8  # mm of normal endplate concavity
    z_bot = -v.mean_height / 2 + concave * central
    z_top = -v.mean_height / 2 + h_lin - mid_extra * central - concave * central
    if v.endplate_irregularity > 0:
        phase = rng.uniform(0, 2 * np.pi, size=2)
        bump = v.endplate_irregularity * np.sin(x / 3.1 + phase[0]) * np.cos(y / 2.7 + phase[1])
        z_top = z_top + bump * central
    inside = (rho < 1) & (z > z_bot) & (z < z_top)
    edge = np.minimum((1 - rho) * min(a, b), np.minimum(z - z_bot, z_top - z))
    # A shell thinner than a voxel still shows, partial-volumed: mark a voxel-thick rim and let
    # the caller scale its contrast by shell_mm / rim thickness.
    shell = inside & (edge < max(v.shell_mm, 0.75 * spacing))
    return inside, shell, z_top - z, z_bot, z_top


def _posterior_field(v: Vertebra, x, y, z):
    """Pedicles, lamina, spinous and transverse processes; the spinal canal."""
    b = v.depth / 2
    canal_y = -b - v.canal_radius - 1.5
    zc = 0.1 * v.mean_height  # posterior elements sit slightly cranial
    r_canal = np.sqrt(x**2 + (y - canal_y) ** 2)
    canal = r_canal < v.canal_radius
    in_z = np.abs(z - zc) < 0.35 * v.height
    pedicle_x = v.canal_radius + 2.5
    pedicles = (
        ((np.abs(x) - pedicle_x) ** 2 + ((z - zc) / 1.3) ** 2 < 4.5**2)
        & (y < -b + 2) & (y > canal_y - 1)
    )
    lamina = (r_canal >= v.canal_radius) & (r_canal < v.canal_radius + 4.5) & (y < canal_y + 2) & in_z
    spin_len = 30 if v.level.startswith("L") else 24
    spin_tilt = 0.0 if v.level.startswith("L") else 0.5  # thoracic spinous processes point caudally
    ys = y - canal_y + v.canal_radius
    spinous = (np.abs(x) < 3.0) & (ys < 0) & (ys > -spin_len) & (np.abs(z - zc + spin_tilt * ys) < 5.5)
    transverse = (
        (np.abs(x) > pedicle_x) & (np.abs(x) < v.transverse_reach)
        & (np.abs(y - canal_y) < 4.0) & (np.abs(z - zc) < 4.5)
    )
    bone = (pedicles | lamina | spinous | transverse) & ~canal
    canal_full = canal  # the canal runs the whole length of the crop
    return bone, canal_full


BODY, DEFORMITY = 1, 2  # bits of a ground-truth mask voxel


def _ground_truth(v: Vertebra, inside, rho, z, z_top) -> np.ndarray:
    """uint8 ground truth of the centre vertebra: bit BODY its body; bit DEFORMITY (fractured only) the
    collapse: the body's footprint between the collapsed upper endplate (from 3 mm below it) and where
    the intact endplate would be. It draws no random numbers, so the crop does not change with it."""
    truth = np.where(inside, BODY, 0).astype(np.uint8)
    if v.grade >= 1:
        intact_top = -v.mean_height / 2 + v.height - 0.8 * np.clip(1 - rho**2, 0, 1)
        truth[(rho < 1) & (z > z_top - 3.0) & (z < intact_top)] |= DEFORMITY
    return truth


def render_crop(patient: dict, center: int, size: int, fov_mm: float, seed: int,
                with_mask: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """The int16 HU crop of `size`^3 voxels centred on vertebra `center` of the patient's spine;
    with `with_mask`, also its ground truth (`_ground_truth`; the crop is the same either way)."""
    rng = np.random.default_rng([seed, patient["index"], center + 1])
    spacing = fov_mm / size
    axis = ((np.arange(size) - (size - 1) / 2) * spacing).astype(np.float32)
    X, Y, Z = np.meshgrid(axis, axis, axis, indexing="ij")
    # small rotation of the whole crop and centroid jitter (as a detector's centroid error)
    angles = np.deg2rad(rng.normal(0, 3, size=3))
    rot = _rotation(*angles)
    pts = np.stack([X, Y, Z], -1) @ rot.T.astype(np.float32) + rng.normal(0, 1.5, size=3).astype(np.float32)
    X, Y, Z = pts[..., 0], pts[..., 1], pts[..., 2]

    spine = [v for v, _ in patient["spine"]]
    vert = spine[center]
    # the crop is centred on the centroid of the vertebra, which lies behind its body centre
    body_y = 9.0 * patient["scale"]
    hu = np.full(X.shape, patient["fat_hu"], dtype=np.float32)
    # muscles: psoas (lateral to the lumbar bodies), erector spinae (posterior), aorta (left anterior)
    lumbar = vert.level.startswith("L")
    psoas_r = (12 if lumbar else 6) * patient["scale"]
    for side in (-1, 1):
        psoas = (X - side * (vert.width / 2 + psoas_r * 0.8)) ** 2 + (Y - body_y) ** 2 < psoas_r**2
        erector = ((X - side * 22) / 14) ** 2 + ((Y + 48) / 16) ** 2 < 1
        hu[psoas | erector] = rng.uniform(40, 60)
    aorta = (X + 12) ** 2 + (Y - body_y - vert.depth / 2 - 12) ** 2 < 11**2
    hu[aorta] = patient["aorta_hu"]

    # vertebra centre offsets along z: stack bodies and discs around the centre vertebra
    offsets = np.zeros(len(spine))
    for i in range(center + 1, len(spine)):  # caudal neighbours (lower levels) below
        offsets[i] = offsets[i - 1] - spine[i - 1].mean_height / 2 - spine[i - 1].disc_below - spine[i].mean_height / 2
    for i in range(center - 1, -1, -1):
        offsets[i] = offsets[i + 1] + spine[i + 1].mean_height / 2 + spine[i].disc_below + spine[i].mean_height / 2

    canal_any = np.zeros(X.shape, bool)
    trab_texture = gaussian_filter(rng.normal(0, 40, size=X.shape), 0.7).astype(np.float32)
    for i, v in enumerate(spine):
        reach = v.height / 2 + max(v.disc_below, 12.0) + 6.0  # body, disc, tilt and rotation margin
        if abs(offsets[i]) - reach > fov_mm / 2:  # cannot reach into the crop
            continue
        tilt = np.deg2rad(v.tilt_deg)
        zl = Z - offsets[i]
        yl = Y - body_y
        yr = np.cos(tilt) * yl - np.sin(tilt) * zl
        zr = np.sin(tilt) * yl + np.cos(tilt) * zl
        inside, shell, dist_top, z_bot, z_top = _body_field(v, X, yr, zr, rng, spacing)
        # disc under this body, down to the next body's top endplate
        rho = np.sqrt((X / (v.width / 2)) ** 2 + (yr / (v.depth / 2)) ** 2)
        if with_mask and i == center:
            truth = _ground_truth(v, inside, rho, zr, z_top)
        disc = (rho < 0.97) & (zr < z_bot) & (zr > z_bot - v.disc_below - 1.0)
        hu[disc] = rng.uniform(70, 110)
        hu[inside] = v.trabecular_hu + trab_texture[inside]
        if v.sclerosis_hu > 0:  # sclerotic band under the collapsed endplate
            band = inside & (dist_top < 3.0)
            hu[band] += v.sclerosis_hu
        fill = min(1.0, v.shell_mm / max(v.shell_mm, 0.75 * spacing))
        hu[shell] = v.trabecular_hu + fill * (v.cortical_hu - v.trabecular_hu)
        if v.osteophyte_mm > 0:
            for zz in (z_bot.max(), -z_bot.max()):
                for ang in rng.uniform(-1.2, 1.2, size=2):
                    cx, cy = np.sin(ang) * v.width / 2, np.cos(ang) * v.depth / 2
                    spur = (X - cx) ** 2 + (yr - cy) ** 2 + (zr - zz) ** 2 < v.osteophyte_mm**2
                    hu[spur] = v.cortical_hu * 0.8
        bone, canal = _posterior_field(v, X, yr, zr)
        hu[bone] = rng.uniform(350, 600)
        canal_any |= canal & ~(inside | bone)
    hu[canal_any & (hu < 200)] = rng.uniform(0, 20)

    # Scanner PSF (blur_mm is its sigma) plus the voxel's own box average at the crop spacing.
    sigma = np.sqrt(patient["blur_mm"] ** 2 + spacing**2 / 12) / spacing
    sigma_z = np.sqrt(patient["blur_mm"] ** 2 + patient["slice_mm"] ** 2 / 12 + spacing**2 / 12) / spacing
    hu = gaussian_filter(hu, sigma=(sigma, sigma, sigma_z))
    # correlated noise: the 0.6-voxel kernel divides sigma by ~2, so draw at twice the target
    hu += gaussian_filter(rng.normal(0, patient["noise_hu"] * 2.0, size=hu.shape), 0.6)
    crop = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    return (crop, truth) if with_mask else crop


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


UNLABELLED_OFFSET = 1 << 16  # unlabelled patients are drawn from disjoint indices (and ids)


def generate(
    n_patients: int, min_vertebrae: int, max_vertebrae: int, fracture_rate: float,
    noise_hu: float, fov_mm: float, crop_size: int, seed: int, progress: bool = False,
    difficulty: float = 0.5, labelled: bool = True, masks: list[np.ndarray] | None = None,
) -> tuple[np.ndarray, pd.DataFrame]:
    """All crops and their table (patient_id, vertebra, label, grade, morphology, ...); given a
    list as `masks`, each crop's ground-truth mask (see `render_crop`) is appended to it.

    `labelled=False` draws the unlabelled pretraining set: other patients (disjoint ids) from the
    same population, with label and grade -1 (their true values stay in `hidden_grade`).
    """
    from tqdm.auto import tqdm

    rows, crops = [], []
    offset, prefix = (0, "synth") if labelled else (UNLABELLED_OFFSET, "synthU")
    rng = np.random.default_rng([seed, 1 << 20, offset])
    counts = rng.integers(min_vertebrae, max_vertebrae + 1, size=n_patients)
    desc = "synthetic phantoms" if labelled else "unlabelled phantoms"
    for i in tqdm(range(n_patients), desc=desc, disable=not progress, leave=False):
        patient = draw_patient(offset + i, int(counts[i]), fracture_rate, noise_hu, seed, difficulty, prefix)
        for pos, (vert, in_labelled_range) in enumerate(patient["spine"]):
            if not in_labelled_range:  # the neighbours at both ends only appear as context
                continue
            crop = render_crop(patient, pos, crop_size, fov_mm, seed, with_mask=masks is not None)
            if masks is not None:
                crop, truth = crop
                masks.append(truth)
            crops.append(crop)
            rows.append({
                "patient_id": patient["patient_id"], "vertebra": vert.level,
                "label": int(vert.grade >= 1) if labelled else -1, "grade": vert.grade if labelled else -1,
                "hidden_grade": vert.grade, "morphology": vert.morphology,
                "height_loss": max(vert.loss_anterior, vert.loss_middle, vert.loss_posterior),
                "trabecular_hu": vert.trabecular_hu, "osteoporotic": patient["osteoporotic"],
                "source": "synthetic",
            })
    return np.stack(crops), pd.DataFrame(rows)
