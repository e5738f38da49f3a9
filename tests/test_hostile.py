"""Hostile and careless input on every surface: each is one line naming the file, key or value at
fault, exit status 2, nothing written under out= and no checkpoint code run."""
import gzip
import os
import pickle
import shutil
import struct

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bench.cli import main
from tests_helpers import SHARED_DATA

TP_CT = SHARED_DATA / "tptbox_sub-ct_label-22_ct.nii.gz"
TP_MASK = SHARED_DATA / "tptbox_sub-ct_seg-vert_label-22_msk.nii.gz"
SUITE = "runs:\n  - {method: resnet18, regimes: [scratch]}\n"
MARKER = "unpickled-code-ran"
CT_MASK = [f"ct={TP_CT}", f"mask={TP_MASK}", "label_map=verse"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("hostile") / "store"
    assert main(["data", "synth", "preset=tiny", f"out={path}"]) == 0
    return path


def _copy(store, tmp_path, damage):
    target = tmp_path / "damaged"
    shutil.copytree(store, target)
    damage(target)
    return target


def _truncate(folder):
    data = (folder / "crops.npy").read_bytes()
    (folder / "crops.npy").write_bytes(data[: len(data) // 3])


def _truncate_masks(folder):
    data = (folder / "masks.npy").read_bytes()
    (folder / "masks.npy").write_bytes(data[: len(data) // 2])


def _reorder(folder):
    crops = np.load(folder / "crops.npy")
    np.save(folder / "crops.npy", crops[::-1].copy())


def _swap_unsampled(folder):
    """Swap two crops that the sampled check on open does not read: only the full check finds them."""
    from bench.datasets.cropstore import VERIFY_SAMPLE

    crops = np.load(folder / "crops.npy")
    sampled = set(np.linspace(0, len(crops) - 1, num=VERIFY_SAMPLE).round().astype(int))
    i, j = [r for r in range(len(crops)) if r not in sampled][:2]
    crops[[i, j]] = crops[[j, i]]
    np.save(folder / "crops.npy", crops)


def _bad_manifest(folder):
    (folder / "manifest.parquet").write_bytes(b"PAR1 not really a parquet file")


def _bad_json(folder):
    (folder / "store.json").write_text("{oops")


def _json_list(folder):
    (folder / "store.json").write_text("[]")


def _huge(tmp_path, gz):
    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4))
    nib.save(img, str(tmp_path / "small.nii"))
    raw = bytearray((tmp_path / "small.nii").read_bytes())
    struct.pack_into("<8h", raw, 40, 3, 1500, 1500, 1500, 1, 1, 1, 1)  # dim: 1500^3, 6.3 GiB of int16
    path = tmp_path / ("huge.nii.gz" if gz else "huge.nii")
    path.write_bytes(gzip.compress(bytes(raw)) if gz else bytes(raw[:360]))
    return path


def _file(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


class _RunsCode:
    """Unpickling this runs a shell command that leaves a marker file: a checkpoint must never be it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _evil_checkpoint(tmp_path):
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"state_dict": _RunsCode(tmp_path / MARKER)}, protocol=2))
    return path


def _splits(tmp_path, text):
    return f"splits={_file(tmp_path, 'splits.csv', text)}"


def _folder(tmp_path, name):
    (tmp_path / name).mkdir()
    return tmp_path / name


def _copy_file(source, target):
    shutil.copyfile(source, target)
    return target


def _resaved(source, target):
    """The CT's voxels under another header: other bytes, the same content."""
    image = nib.load(source)
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj).astype(np.int32), image.affine), target)
    return target


def _suite(tmp_path, text):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return f"suite={path}"


CASES = {  # name: (args builder (tmp_path, store) -> list, expected text in the one line)
    "seeds_zero": (lambda t, s: ["run", _suite(t, SUITE), "seeds=0"], "bad value for 'seeds': '0'"),
    "seeds_negative": (lambda t, s: ["run", _suite(t, SUITE), "seeds=-1"], "expected a whole number >= 1"),
    "seeds_text": (lambda t, s: ["run", _suite(t, SUITE), "seeds=many"], "bad value for 'seeds': 'many'"),
    "ray_cpus_text": (lambda t, s: ["run", _suite(t, SUITE), "ray.cpus_per_trial=abc"],
                      "bad value for 'ray.cpus_per_trial': 'abc'"),
    "ray_gpus_negative": (lambda t, s: ["run", _suite(t, SUITE), "ray.gpus_per_trial=-1"],
                          "bad value for 'ray.gpus_per_trial'"),
    "ray_concurrent_fraction": (lambda t, s: ["run", _suite(t, SUITE), "ray.max_concurrent=1.5"],
                                "expected a whole number >= 0"),
    "resume_word": (lambda t, s: ["run", _suite(t, SUITE), "resume=maybe"], "bad value for 'resume'"),
    "suite_gpus_per_run_without_gpus": (lambda t, s: ["run", _suite(t, SUITE), "ray.gpus_per_run=2"],
                                        "ray.gpus_per_run=2: the Ray cluster has 0 GPUs; add device=cpu"),
    "suite_gpus_per_run_and_devices": (lambda t, s: ["run", _suite(t, SUITE), "ray.gpus_per_run=2", "devices=3"],
                                       "ray.gpus_per_run=2 and devices=3 disagree; give one of them"),
    "devices_zero": (lambda t, s: ["run", "method=resnet18", "preset=tiny", "devices=0"],
                     "bad value for 'devices': 0; expected > 0"),
    "explain_word": (lambda t, s: ["run", _suite(t, SUITE), "explain=perhaps"], "bad value for 'explain'"),
    "suite_explain_n_zero": (lambda t, s: ["run", _suite(t, SUITE), "explain=true", "explain.n=0"],
                             "bad value for 'explain.n': '0'; expected a whole number >= 1"),
    "suite_runs_number": (lambda t, s: ["run", _suite(t, "runs: 5\n")], "'runs' is int 5"),
    "suite_method_list": (lambda t, s: ["run", _suite(t, "runs:\n  - {method: [a]}\n")],
                          "entry 1 field 'method' is ['a']; expected a string"),
    "suite_regimes_string": (lambda t, s: ["run", _suite(t, "runs:\n  - {method: resnet18, regimes: scratch}\n")],
                             "field 'regimes' is 'scratch'; expected a list of strings"),
    "suite_overrides_string": (lambda t, s: ["run", _suite(t, "runs:\n  - {method: resnet18, overrides: lr=1}\n")],
                               "field 'overrides' is 'lr=1'"),
    "suite_unknown_field": (lambda t, s: ["run", _suite(t, "seed: 3\n" + SUITE)], "unknown field 'seed'"),
    "suite_entry_unknown_field": (lambda t, s: ["run", _suite(t, "runs:\n  - {method: resnet18, regime: x}\n")],
                                  "entry 1 has unknown field 'regime'"),
    "suite_seeds_text": (lambda t, s: ["run", _suite(t, "seeds: abc\n" + SUITE)], "field 'seeds': 'abc'"),
    "suite_entry_not_mapping": (lambda t, s: ["run", _suite(t, "runs:\n  - resnet18\n")],
                                "entry 1 is 'resnet18'; expected a mapping"),
    "nested_key_without_section": (lambda t, s: ["run", "method=video_ct_mae", "pe_cropping=false"],
                                   "did you mean 'model.pe_cropping'?"),
    "sub_key_of_a_value": (lambda t, s: ["run", "method=video_ct_mae", "method.pe_cropping=false"],
                           "'method' (command line) is a single value"),
    "store_truncated_crops": (lambda t, s: ["run", "method=resnet18", f"data={_copy(s, t, _truncate)}"],
                              "crops.npy is unreadable or truncated"),
    "store_truncated_masks": (lambda t, s: ["run", "method=resnet18", f"data={_copy(s, t, _truncate_masks)}"],
                              "masks.npy is unreadable or truncated"),
    "store_truncated_masks_verify": (lambda t, s: ["data", "info", str(_copy(s, t, _truncate_masks)), "--verify"],
                                     "masks.npy is unreadable or truncated"),
    "store_corrupt_manifest": (lambda t, s: ["run", "method=resnet18", f"data={_copy(s, t, _bad_manifest)}"],
                               "manifest.parquet is unreadable"),
    "store_corrupt_json": (lambda t, s: ["run", "method=resnet18", f"data={_copy(s, t, _bad_json)}"],
                           "store.json is unreadable"),
    "store_json_list": (lambda t, s: ["run", "method=resnet18", f"data={_copy(s, t, _json_list)}"],
                        "store.json is unreadable"),
    "store_reordered_crops": (lambda t, s: ["run", "method=resnet18", f"data={_copy(s, t, _reorder)}"],
                              "does not match its checksum"),
    "store_swapped_unsampled_crops": (lambda t, s: ["run", "method=resnet18", f"data={_copy(s, t, _swap_unsampled)}"],
                                      "does not match its checksum"),
    "info_verify_reordered": (lambda t, s: ["data", "info", str(_copy(s, t, _reorder)), "--verify"],
                              "does not match its checksum"),
    "pretrain_data_missing": (lambda t, s: ["run", "method=mae3d", "regime=vertebrae", f"data={s}",
                                            f"pretrain.data={t / 'nowhere'}"], "is not a crop store"),
    "labels_empty": (lambda t, s: ["data", "ingest", f"ct={TP_CT}", f"mask={TP_MASK}", "label_map=verse",
                                   f"labels={_write(t / 'e.csv', b'')}"], "not a readable CSV (EmptyDataError"),
    "labels_binary": (lambda t, s: ["data", "ingest", f"ct={TP_CT}", f"mask={TP_MASK}", "label_map=verse",
                                    f"labels={_write(t / 'b.csv', bytes(range(200, 256)) * 4)}"],
                      "not a readable CSV (UnicodeDecodeError"),
    "huge_header_nii": (lambda t, s: ["data", "ingest", f"ct={_huge(t, False)}", f"mask={TP_MASK}",
                                      "label_map=verse"], "the header declares (1500, 1500, 1500) voxels"),
    "huge_header_nii_gz": (lambda t, s: ["data", "ingest", f"ct={_huge(t, True)}", f"mask={TP_MASK}",
                                         "label_map=verse"], "the header declares (1500, 1500, 1500) voxels"),
    "grades_without_verse": (lambda t, s: ["data", "ingest", f"ct={TP_CT}", f"mask={TP_MASK}", "label_map=verse",
                                           f"grades={t / 'g.xlsx'}"], "it needs verse=FOLDER"),
    "masks_without_rsna": (lambda t, s: ["data", "ingest", f"ct={TP_CT}", f"mask={TP_MASK}", "label_map=verse",
                                         f"masks={t}"], "it needs rsna=FOLDER"),
    "verse_empty_folder": (lambda t, s: ["data", "ingest", f"verse={t}"], "expected the folders rawdata/"),
    "rsna_empty_folder": (lambda t, s: ["data", "ingest", f"rsna={t}"], "expected the folder train_images/"),
    # CLI keys: names, types and ranges
    "unknown_method": (lambda t, s: ["run", "method=nosuch"], "unknown method 'nosuch'; valid: "),
    "unknown_regime": (lambda t, s: ["run", "method=resnet18", "regime=sometimes"],
                       "does not support regime 'sometimes'; valid: scratch"),
    "regime_without_pretext": (lambda t, s: ["run", "method=resnet18", "regime=vertebrae"],
                               "does not support regime 'vertebrae'"),
    "unknown_preset": (lambda t, s: ["run", "method=resnet18", "preset=huge"], "unknown preset 'huge'; valid: "),
    "epochs_zero": (lambda t, s: ["run", "method=resnet18", "epochs=0"], "bad value for 'epochs': 0; expected > 0"),
    "epochs_text": (lambda t, s: ["run", "method=resnet18", "epochs=ten"], "bad value for 'epochs' (command line)"),
    "batch_size_zero": (lambda t, s: ["run", "method=resnet18", "batch_size=0"], "bad value for 'batch_size': 0"),
    "lr_negative": (lambda t, s: ["run", "method=resnet18", "lr=-1"], "bad value for 'lr': -1.0; expected >= 0"),
    "warmup_negative": (lambda t, s: ["run", "method=resnet18", "warmup_epochs=-1"], "bad value for 'warmup_epochs'"),
    "layer_decay_zero": (lambda t, s: ["run", "method=mae3d", "layer_decay=0"], "bad value for 'layer_decay': 0.0"),
    "label_smoothing_one": (lambda t, s: ["run", "method=resnet18", "label_smoothing=1"],
                            "bad value for 'label_smoothing': 1.0"),
    "threshold_above_one": (lambda t, s: ["run", "method=resnet18", "threshold=2"], "bad value for 'threshold'"),
    "crop_size_too_small": (lambda t, s: ["run", "method=resnet18", "crop_size=3"], "expected <= crop_size - 2"),
    "train_fraction_zero": (lambda t, s: ["run", "method=resnet18", "train_fraction=0"],
                            "bad value for 'train_fraction': 0.0; expected in (0, 1]"),
    "train_fraction_above_one": (lambda t, s: ["run", "method=resnet18", "train_fraction=1.5"],
                                 "bad value for 'train_fraction': 1.5"),
    "protocol_unknown": (lambda t, s: ["run", "method=resnet18", "protocol=svm"], "Invalid value 'svm'"),
    "task_unknown": (lambda t, s: ["run", "method=resnet18", "task=grading"], "Invalid value 'grading'"),
    "select_unknown": (lambda t, s: ["run", "method=resnet18", "select=best"], "Invalid value 'best'"),
    "amp_dtype_unknown": (lambda t, s: ["run", "method=resnet18", "amp_dtype=fp8"], "Invalid value 'fp8'"),
    "device_unknown": (lambda t, s: ["run", "method=resnet18", "device=tpu"], "Invalid value 'tpu'"),
    "num_workers_negative": (lambda t, s: ["run", "method=resnet18", "num_workers=-1"],
                             "bad value for 'num_workers': -1"),
    "typo_key": (lambda t, s: ["run", "method=resnet18", "lrr=0.1"], "unknown config key 'lrr' (command line)"),
    "typo_model_key": (lambda t, s: ["run", "method=resnet18", "model.depthh=3"], "unknown config key 'model.depthh'"),
    "not_key_value": (lambda t, s: ["run", "method"], "bad argument 'method': expected key=value"),
    "key_twice": (lambda t, s: ["run", "method=resnet18", "seed=1", "seed=2"], "key 'seed' given twice"),
    "probe_grid_text": (lambda t, s: ["run", "method=resnet18", "protocol=linear", "probe.c_grid=abc"],
                        "bad value for 'probe.c_grid' (command line): expected a list"),
    "probe_grid_empty": (lambda t, s: ["run", "method=resnet18", "protocol=linear", "probe.c_grid=[]"],
                         "bad value for 'probe.c_grid': []; expected positive numbers"),
    "probe_grid_negative": (lambda t, s: ["run", "method=resnet18", "protocol=linear", "probe.c_grid=[-1]"],
                            "expected positive numbers"),
    "knn_k_zero": (lambda t, s: ["run", "method=resnet18", "protocol=knn", "probe.knn_k=0"],
                   "bad value for 'probe.knn_k'"),
    "pretrain_epochs_zero": (lambda t, s: ["run", "method=mae3d", "regime=vertebrae", "pretrain.epochs=0"],
                             "bad value for 'pretrain.epochs': 0"),
    "fracture_rate_two": (lambda t, s: ["run", "method=resnet18", "synthetic.fracture_rate=2"],
                          "bad value for 'synthetic.fracture_rate': 2.0"),
    "no_test_cohort": (lambda t, s: ["run", "method=resnet18", "synthetic.n_test_patients=0"],
                       "'synthetic.n_val_patients' / 'synthetic.n_test_patients'"),
    "views_axis_unknown": (lambda t, s: ["run", "method=video_mae", "views.axis=diagonal"], "Invalid value 'diagonal'"),
    "views_frames_zero": (lambda t, s: ["run", "method=video_mae", "views.frames=0"], "bad value for 'views.frames'"),
    "variant_traversal": (lambda t, s: ["run", "method=resnet18", "variant=../../x"], "bad value for 'variant'"),
    "unknown_suite": (lambda t, s: ["run", "suite=nosuchsuite"], "unknown suite 'nosuchsuite'"),
    "tune_without_regime": (lambda t, s: ["tune", "method=resnet18"], "bench tune needs method=NAME and regime=NAME"),
    "cost_unknown_method": (lambda t, s: ["cost", "methods=nosuch"], "unknown method 'nosuch' in methods="),
    # suite files
    "suite_yaml_invalid": (lambda t, s: ["run", _suite(t, "runs: [ {method: resnet18\n")], "not valid YAML"),
    "suite_empty": (lambda t, s: ["run", _suite(t, "")], "expected a mapping with 'runs'"),
    # data sets and splits
    "data_missing": (lambda t, s: ["run", "method=resnet18", f"data={t / 'nowhere'}"],
                     "is neither a registered data set nor an existing path"),
    "splits_missing": (lambda t, s: ["run", "method=resnet18", f"splits={t / 'nowhere.csv'}"], "no such file"),
    "splits_wrong_columns": (lambda t, s: ["run", "method=resnet18", _splits(t, "who,what\n1,2\n")],
                             "expected columns patient_id,split"),
    "splits_unknown_split": (lambda t, s: ["run", "method=resnet18", f"data={s}",
                                           _splits(t, "patient_id,split\nsynth000-00000,holdout\n")],
                             "has split 'holdout'; valid: train, val, test"),
    "splits_missing_patients": (lambda t, s: ["run", "method=resnet18", f"data={s}",
                                              _splits(t, "patient_id,split\nnobody,train\n")],
                                "has no split for"),
    # checkpoints
    "weights_missing": (lambda t, s: ["run", "method=models_genesis", "regime=public",
                                      f"weights.public={t / 'nowhere.pt'}"], "no such file"),
    "weights_pickle_runs_code": (lambda t, s: ["run", "method=models_genesis", "regime=public",
                                               f"weights.public={_evil_checkpoint(t)}"],
                                 "refused, the checkpoint holds pickled objects other than tensors"),
    "weights_text_file": (lambda t, s: ["run", "method=models_genesis", "regime=public",
                                        f"weights.public={_file(t, 'w.pt', 'hello')}"],
                          "not a checkpoint (neither a torch.save archive nor a pickle"),
    "weights_sha256_mismatch": (lambda t, s: ["run", "method=models_genesis", "regime=public",
                                              f"weights.public={_file(t, 'w.pt', 'hello')}", "weights.sha256=00ff"],
                                "does not match the expected"),
    "weights_bad_safetensors": (lambda t, s: ["run", "method=models_genesis", "regime=public",
                                              f"weights.public={_file(t, 'w.safetensors', 'nope')}"],
                                "not a readable safetensors file"),
    # run folders and reports
    "report_missing": (lambda t, s: ["report", str(t / "nowhere")], "does not exist"),
    "report_empty_folder": (lambda t, s: ["report", str(_folder(t, "empty"))], "no runs (metrics.json) under"),
    "report_bootstrap_text": (lambda t, s: ["report", str(_folder(t, "empty")), "bootstrap=abc"],
                              "bad value for 'bootstrap': 'abc'"),
    "report_unknown_key": (lambda t, s: ["report", str(_folder(t, "empty")), "colour=red"],
                           "unknown report key 'colour'"),
    "explain_not_a_run": (lambda t, s: ["explain", str(_folder(t, "notrun"))], "is not a run folder"),
    "explain_n_zero": (lambda t, s: ["explain", str(_folder(t, "notrun")), "n=0"], "bad value for 'n': '0'"),
    # images and ingestion
    "info_not_a_store": (lambda t, s: ["data", "info", str(t / "nowhere")], "is not a crop store"),
    "ingest_same_file": (lambda t, s: ["data", "ingest", f"ct={TP_CT}", f"mask={TP_CT}", "label_map=verse"],
                         "ct and mask are the same path"),
    "ingest_ct_missing": (lambda t, s: ["data", "ingest", f"ct={t / 'no.nii.gz'}", f"mask={TP_MASK}",
                                        "label_map=verse"], "no such file"),
    "ingest_ct_not_nifti": (lambda t, s: ["data", "ingest", f"ct={_file(t, 'ct.nii.gz', 'hello')}", f"mask={TP_MASK}",
                                          "label_map=verse"], "not a readable NIfTI file"),
    "ingest_label_map_unknown": (lambda t, s: ["data", "ingest", f"ct={TP_CT}", f"mask={TP_MASK}",
                                               "label_map=martian"], "unknown label map 'martian'"),
    "ingest_unknown_key": (lambda t, s: ["data", "ingest", *CT_MASK, "spacingg=1"], "unknown config key 'spacingg'"),
    # round 3: numeric keys checked where they are parsed, runs with an end
    "seed_negative": (lambda t, s: ["run", "method=resnet18", "seed=-1"], "bad value for 'seed': -1"),
    "seed_huge": (lambda t, s: ["run", "method=resnet18", "seed=1e20"], "bad value for 'seed'"),
    "pretrain_seed_negative": (lambda t, s: ["run", "method=mae3d", "regime=vertebrae", "pretrain.seed=-2"],
                               "bad value for 'pretrain.seed': -2"),
    "tune_samples_negative": (lambda t, s: ["tune", "method=resnet18", "regime=scratch", "samples=-1"],
                              "bad value for 'samples': '-1'"),
    "tune_grace_zero": (lambda t, s: ["tune", "method=resnet18", "regime=scratch", "grace_epochs=0"],
                        "bad value for 'grace_epochs': '0'"),
    "tune_grace_negative": (lambda t, s: ["tune", "method=resnet18", "regime=scratch", "grace_epochs=-2"],
                            "bad value for 'grace_epochs': '-2'"),
    "tune_cpus_negative": (lambda t, s: ["tune", "method=resnet18", "regime=scratch", "ray.cpus_per_trial=-1"],
                           "bad value for 'ray.cpus_per_trial': '-1'"),
    "tune_samples_zero": (lambda t, s: ["tune", "method=resnet18", "regime=scratch", "samples=0"],
                          "bad value for 'samples': '0'; expected a whole number >= 1"),
    "ray_address_unreachable": (lambda t, s: ["run", _suite(t, SUITE), "ray.address=127.0.0.1:1"],
                                "ray.address '127.0.0.1:1': nothing answers there"),
    "report_bootstrap_negative": (lambda t, s: ["report", str(_folder(t, "empty")), "bootstrap=-5"],
                                  "bad value for 'bootstrap': '-5'"),
    "report_name_escapes": (lambda t, s: ["report", str(_folder(t, "empty")), "name=../.."],
                            "bad value for 'name': '../..'"),
    "ingest_mask_is_a_copy_of_the_ct": (lambda t, s: ["data", "ingest", f"ct={TP_CT}",
                                                      f"mask={_copy_file(TP_CT, t / 'mask.nii.gz')}",
                                                      "label_map=verse"], "has the same content as the CT"),
    "ingest_mask_is_the_ct_resaved": (lambda t, s: ["data", "ingest", f"ct={TP_CT}",
                                                    f"mask={_resaved(TP_CT, t / 'mask.nii.gz')}", "label_map=verse"],
                                      "holds negative values"),
    "out_cannot_exist": (lambda t, s: ["run", "method=resnet18", "epochs=1", "out=/proc/vertebench-out"],
                         "cannot read or write '/proc/vertebench-out'"),
}


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_input_is_one_line_exit_2_and_writes_nothing(case, store, tmp_path, capsys):
    build, expected = CASES[case]
    args = build(tmp_path, store)
    out = tmp_path / "out"
    if not any(a.startswith("out=") for a in args) and args[0] != "explain" and args[:2] != ["data", "info"]:
        args.append(f"out={out}")
    if args[0] in ("run", "tune"):
        args += [] if any(a.startswith("preset=") for a in args) else ["preset=tiny"]
        args += [] if args[1].startswith("suite=") else [f"cache_dir={tmp_path / 'cache'}"]
    if args[:2] == ["data", "ingest"]:
        args += ["progress=false", "workers=1"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bench: error: ") and expected in err[0], err
    assert not out.exists()
    assert not (tmp_path / MARKER).exists(), "a checkpoint ran code"


def test_report_skips_a_broken_run_folder_with_a_warning(store, tmp_path, capsys):
    runs = tmp_path / "runs"
    for seed in range(2):
        assert main(["run", "method=_test_tiny_cnn", "preset=tiny", "epochs=1", f"seed={seed}", f"data={store}",
                     f"out={runs}", f"cache_dir={tmp_path / 'cache'}"]) == 0
    first, second = sorted((runs / "single").iterdir())
    (first / "predictions.parquet").unlink()
    (second / "config.yaml").write_text("")
    assert main(["report", str(runs), f"out={tmp_path / 'report'}", "bootstrap=10"]) == 2  # nothing left to show
    err = capsys.readouterr().err
    assert f"skipping run '{first}': predictions.parquet is missing" in err
    assert f"skipping run '{second}': config.yaml is empty" in err
    assert main(["run", "method=_test_tiny_cnn", "preset=tiny", "epochs=1", "seed=5", f"data={store}",
                 f"out={runs}", f"cache_dir={tmp_path / 'cache'}"]) == 0
    assert main(["report", str(runs), f"out={tmp_path / 'report'}", "bootstrap=10"]) == 0
    assert pd.read_parquet(tmp_path / "report" / "cells.parquet")["seeds"].tolist() == [1]


def _hand_run(folder, auc_strength=1.0):
    """A finished run folder written directly (known predictions), for report robustness."""
    from omegaconf import OmegaConf

    from bench.metrics import binary_metrics
    from bench.store import write_run

    rng = np.random.default_rng(0)
    labels = (rng.random(200) < 0.3).astype(int)
    scores = 1 / (1 + np.exp(-(auc_strength * (labels - 0.5) * 4 + rng.normal(0, 1, 200))))
    preds = pd.DataFrame({"patient_id": [f"p{i // 4}" for i in range(200)],
                          "vertebra": [f"L{i % 4}" for i in range(200)], "label": labels, "score": scores,
                          "prediction": (scores >= 0.5).astype(int)})
    cfg = OmegaConf.create({"method": "resnet18", "regime": "scratch", "seed": 0, "preset": "tiny", "model": {}})
    metrics = {"test": binary_metrics(labels, scores), "val": {"auc": 0.9, "n": 200, "n_positive": 60}, "epochs": [],
               "cost": {}, "pretraining": {}, "data": {"name": "hand", "fingerprint": "f" * 64}}
    write_run(folder, cfg, metrics, preds, {"started": "2026-01-01T00:00:00"})
    return folder


@pytest.mark.parametrize("damage", ["garbage_parquet", "metrics_wrong_type", "garbage_explain"])
def test_one_broken_run_folder_is_one_line_and_the_report_goes_on(tmp_path, capsys, damage):
    import json

    good = _hand_run(tmp_path / "runs" / "a" / "resnet18-scratch-s0")
    bad = _hand_run(tmp_path / "runs" / "b" / "resnet18-scratch-s1")
    if damage == "garbage_parquet":
        (bad / "predictions.parquet").write_bytes(b"PAR1 not really")
    elif damage == "metrics_wrong_type":
        metrics = json.loads((bad / "metrics.json").read_text())
        metrics["test"]["auc"] = "high"
        (bad / "metrics.json").write_text(json.dumps(metrics))
    else:
        (bad / "explain").mkdir()
        (bad / "explain" / "explain.json").write_text('{"maps": 3, "summary": "x"}')
    assert main(["report", str(tmp_path / "runs"), f"out={tmp_path / 'rep'}", "bootstrap=20"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("bench report: skipping")]
    assert len(err) == 1 and str(bad) in err[0], err
    html = (tmp_path / "rep" / "index.html").read_text()
    assert good.name in html


def test_a_report_embeds_no_file_outside_the_run_folder(tmp_path):
    """explain.json is a received file: an absolute path or `..` in it must not pull a local image in."""
    import json

    from PIL import Image

    from bench.explain_scores import SCORES

    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(secret)
    run = _hand_run(tmp_path / "runs" / "s" / "resnet18-scratch-s0")
    (run / "explain").mkdir()
    vertebrae = [{"kind": kind, "patient_id": "p0", "vertebra": "L0", "score": 0.9,
                  "files": {"png": str(secret) if kind == "TP" else "../../../../secret.png"}}
                 for kind in ("TP", "FN")]
    (run / "explain" / "explain.json").write_text(json.dumps({
        "maps": ["occlusion"], "vertebrae": vertebrae,
        "summary": {"occlusion": {s: {"mean": 0.5, "lo": 0.4, "hi": 0.6} for s in SCORES}}}))
    assert main(["report", str(tmp_path / "runs"), f"out={tmp_path / 'rep'}", "bootstrap=20"]) == 0
    assert "data:image/jpeg" not in (tmp_path / "rep" / "index.html").read_text()


def test_every_crop_is_checked_once_per_version_of_the_store(store, tmp_path):
    from bench.datasets.cropstore import ensure_verified, open_store
    from bench.errors import BenchError

    copy = _copy(store, tmp_path, lambda folder: None)
    crops, manifest, _ = open_store(copy)
    assert ensure_verified(copy, crops, manifest, tmp_path / "cache")  # first sight: every crop read
    assert not ensure_verified(copy, crops, manifest, tmp_path / "cache")  # unchanged: not again
    _swap_unsampled(copy)
    crops, manifest, _ = open_store(copy)  # the sample on open does not see the swap
    with pytest.raises(BenchError, match="does not match its checksum"):
        ensure_verified(copy, crops, manifest, tmp_path / "cache")


def test_a_full_disk_names_the_file_it_could_not_write(tmp_path, capsys, monkeypatch):
    """numpy's "N requested and M written" names no file: the one line does."""
    import bench.datasets.ingest_many as ingest_many

    def full(*args, **kwargs):
        raise OSError(28, "4194304 requested and 0 written")

    monkeypatch.setattr(ingest_many.np, "save", full)
    out = tmp_path / "store"
    assert main(["data", "ingest", *CT_MASK, f"out={out}", "progress=false", "workers=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot read or write '" in err[0] and ".staging" in err[0], err
    assert "requested and 0 written" in err[0] and not out.exists()


def test_a_full_disk_under_out_names_the_model_file(store, tmp_path, capsys, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                              "\"No space left on device\" })")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "runs"
    assert main(["run", "method=_test_tiny_cnn", "preset=tiny", "epochs=1", f"data={store}", f"out={out}",
                 f"cache_dir={tmp_path / 'cache'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.safetensors" in err[0] and "No space left" in err[0], err
    assert not any(out.rglob("metrics.json"))
