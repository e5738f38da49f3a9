"""Ingestion against a naive MONAI pipeline, loading against a plain copy, and ingestion memory.

Run: pytest tests/benchmarks/test_bench_ingest.py --benchmark-enable -s
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from big_ct import make_big_ct


@pytest.fixture(scope="module")
def big_ct(tmp_path_factory):
    return make_big_ct(tmp_path_factory.mktemp("bigct"))


def ours(ct, mask):
    from bench.datasets.ingest import Case, IngestOptions, ingest_case

    crops, rows, skipped = ingest_case(Case(str(ct), str(mask), "big"), IngestOptions(label_map="totalseg_v2"))
    return crops


def naive_monai(ct, mask):
    """What a first script does: load, reorient and resample the WHOLE volume to 1 mm for each
    vertebra, then crop 96^3 around its centroid (padding with -1000 where the scan ends)."""
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Orientation, Spacing

    load = Compose([LoadImage(image_only=True), EnsureChannelFirst(), Orientation(axcodes="RAS")])
    image, labels = load(str(ct)), load(str(mask))
    ids = [int(i) for i in np.unique(np.asarray(labels)) if i]
    crops = []
    for label in ids:
        img_1mm = Spacing(pixdim=1.0, mode="bilinear")(image)
        lab_1mm = Spacing(pixdim=1.0, mode="nearest")(labels)
        crops.append(_crop_96(img_1mm, np.asarray(lab_1mm[0]), label))
    return crops


def _crop_96(img_1mm, lab_1mm: np.ndarray, label: int):
    """MONAI's 96^3 crop around a vertebra's centroid, padded with -1000 where the scan ends."""
    from monai.transforms import SpatialCrop, SpatialPad

    centre = np.argwhere(lab_1mm == label).mean(0).round().astype(int)
    crop = SpatialCrop(roi_center=centre.tolist(), roi_size=(96, 96, 96))(img_1mm)
    return SpatialPad(spatial_size=(96, 96, 96), value=-1000)(crop)


def monai_resample_once(ct, mask):
    """The better script: reorient and resample the whole volume to 1 mm once, then crop 96^3 around
    every vertebra's centroid (padding with -1000 where the scan ends)."""
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Orientation, Spacing

    load = Compose([LoadImage(image_only=True), EnsureChannelFirst(), Orientation(axcodes="RAS")])
    image, labels = load(str(ct)), load(str(mask))
    img_1mm, lab_1mm = Spacing(pixdim=1.0, mode="bilinear")(image), Spacing(pixdim=1.0, mode="nearest")(labels)
    lab = np.asarray(lab_1mm[0])
    crops = [_crop_96(img_1mm, lab, label) for label in (int(i) for i in np.unique(lab) if i)]
    return crops


def test_ingestion_vs_monai_resampling_once(benchmark, big_ct, report_lines):
    """The goal of #32: >= 10x a MONAI pipeline that resamples the volume once (as many crops)."""
    ct, mask = big_ct
    t0 = time.perf_counter()
    baseline = monai_resample_once(ct, mask)
    monai_s = time.perf_counter() - t0
    crops = benchmark.pedantic(ours, args=(ct, mask), rounds=3, iterations=1)
    assert len(crops) == len(baseline) == 17
    ours_s = benchmark.stats.stats.median
    report_lines.append(f"ingest 512x512x400, 17 vertebrae: ours {ours_s:.2f} s, MONAI resampling once "
                        f"{monai_s:.2f} s, speed-up {monai_s / ours_s:.1f}x (goal >= 10x)")
    assert monai_s / ours_s >= 10


def test_ingestion_vs_naive_monai(benchmark, big_ct, report_lines):
    ct, mask = big_ct
    t0 = time.perf_counter()
    baseline = naive_monai(ct, mask)
    naive_s = time.perf_counter() - t0
    crops = benchmark.pedantic(ours, args=(ct, mask), rounds=3, iterations=1)
    assert len(crops) == len(baseline) == 17
    ours_s = benchmark.stats.stats.median
    report_lines.append(f"ingest 512x512x400, 17 vertebrae: ours {ours_s:.2f} s, naive MONAI {naive_s:.2f} s, "
                        f"speed-up {naive_s / ours_s:.1f}x (goal >= 5x)")
    assert naive_s / ours_s >= 5


def test_loading_slice_views_vs_plain_copy(benchmark, tmp_path, report_lines):
    """Read every crop of a store through the training dataset (HU scaling + 16-slice view) against
    copying the same bytes out of the same memory map."""
    from bench.datasets.torch_data import SliceViewDataset

    rng = np.random.default_rng(0)
    path = tmp_path / "crops.npy"
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.int16, shape=(256, 96, 96, 96))
    arr[:] = rng.integers(-1000, 1500, size=(256, 96, 96, 96), dtype=np.int16)
    arr.flush()
    crops = np.load(path, mmap_mode="r")
    dataset = SliceViewDataset(crops, np.arange(256), np.zeros(256), augment=True, frames=16, channels=1)

    def load_all():
        return sum(float(dataset[i][0][0, 0, 0, 0]) for i in range(len(dataset)))

    def copy_all():
        return sum(float(np.array(crops[i])[0, 0, 0]) for i in range(len(crops)))

    copy_s = min(_timed(copy_all) for _ in range(3))
    benchmark.pedantic(load_all, rounds=3, iterations=1)
    ours_s = benchmark.stats.stats.median
    report_lines.append(f"load 256 crops of 96^3 as 16-slice views: ours {ours_s:.3f} s, plain copy {copy_s:.3f} s, "
                        f"throughput ratio {copy_s / ours_s:.2f}x of the copy (goal >= 0.5x)")
    assert copy_s / ours_s >= 0.5


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def test_ingestion_memory_peak(big_ct, report_lines):
    """Peak memory of ingesting one CT, in a fresh process: tracemalloc peak (numpy and Python
    allocations) and the growth of the peak RSS (VmHWM, which exec resets; ru_maxrss would carry
    the parent's peak over), both against the CT's in-memory size."""
    ct, mask = big_ct
    code = textwrap.dedent(f"""
        import tracemalloc
        from bench.datasets.ingest import Case, IngestOptions, ingest_case
        def status(key):
            line = next(l for l in open("/proc/self/status") if l.startswith(key))
            return int(line.split()[1]) * 1024
        base = status("VmHWM:")
        tracemalloc.start()
        crops, rows, skipped = ingest_case(Case({str(ct)!r}, {str(mask)!r}, "big"),
                                           IngestOptions(label_map="totalseg_v2"))
        peak = tracemalloc.get_traced_memory()[1]
        print(peak, status("VmHWM:") - base, len(crops))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak, rss_growth, n = (int(v) for v in out.stdout.split())
    ct_bytes = 512 * 512 * 400 * 2
    report_lines.append(f"ingest memory: tracemalloc peak {peak / ct_bytes:.2f}x the CT, peak-RSS growth "
                        f"{rss_growth / ct_bytes:.2f}x the CT ({ct_bytes / 2**20:.0f} MiB int16; goal < 3x)")
    assert n == 17 and peak < 3 * ct_bytes and rss_growth < 3 * ct_bytes


def test_dicom_series_against_the_same_ct_as_nifti(big_ct, tmp_path, report_lines):
    """The 512 x 512 x 400 CT as 400 single-slice DICOM files: read alone and read + ingest, against
    the same volume from its .nii.gz. Both give the same crops (to rounding: DICOM geometry is text)."""
    import nibabel as nib

    from bench.datasets.nifti import load_volume
    from tests_helpers import write_dicom_series

    ct, mask = big_ct
    image = nib.load(str(ct))
    series = write_dicom_series(np.asanyarray(image.dataobj), image.affine, tmp_path / "series")
    read_nifti = min(_timed(lambda: load_volume(ct, "CT")) for _ in range(2))
    read_dicom = min(_timed(lambda: load_volume(series, "CT")) for _ in range(2))
    nifti_s = min(_timed(lambda: ours(ct, mask)) for _ in range(2))
    dicom_s = min(_timed(lambda: ours(series, mask)) for _ in range(2))
    assert np.abs(ours(series, mask).astype(int) - ours(ct, mask).astype(int)).max() <= 1
    report_lines.append(f"DICOM series (400 files) vs .nii.gz, 512x512x400: read {read_dicom:.2f} s vs "
                        f"{read_nifti:.2f} s ({read_dicom / read_nifti:.2f}x); read + ingest {dicom_s:.2f} s vs "
                        f"{nifti_s:.2f} s ({dicom_s / nifti_s:.2f}x)")
