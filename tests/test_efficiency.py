"""The report's compute accounting: artifacts count once however many runs share them, cached
features count nowhere, and each stage's rate is compared with the machine's matmul rate."""
import json

import pytest
import torch

from bench.flops import counted, matmul_rate
from bench.reports.efficiency import efficiency_rows, stage_compute


def _artifact(path, flops, seconds, parent=None):
    path.mkdir(parents=True)
    spec = {"dtype": "float32", "parent": {"artifact": str(parent)} if parent else {}}
    (path / "pretrain.json").write_text(json.dumps({"spec": spec, "flops": flops, "train_s": seconds, "threads": 1}))
    return path


def _run(path, cost, artifact=None):
    path.mkdir(parents=True)
    (path / "metrics.json").write_text(json.dumps({"cost": cost, "pretraining": {"artifact": str(artifact)}
                                                   if artifact else {}}))
    return str(path)


def test_shared_artifacts_count_once_and_cached_features_nowhere(tmp_path):
    public = _artifact(tmp_path / "a" / "public", 4e12, 40.0)
    vertebrae = _artifact(tmp_path / "a" / "vertebrae", 2e12, 10.0, parent=public)
    runs = [_run(tmp_path / "r1", {"extract_flops": 1e12, "extract_s": 5.0, "threads": 1}, vertebrae),
            _run(tmp_path / "r2", {"extract_flops": 0.0, "extract_s": 0.0, "threads": 1}, vertebrae),  # cached
            _run(tmp_path / "r3", {"train_flops": 3e12, "train_s": 30.0, "amp_dtype": None, "threads": 1})]
    compute = stage_compute(runs)
    assert compute["pretraining (float32)"]["flops"] == pytest.approx(6e12)
    assert compute["pretraining (float32)"]["seconds"] == pytest.approx(50.0)
    assert compute["feature extraction (float32)"]["flops"] == pytest.approx(1e12)
    rows = efficiency_rows(compute, {"threads": 1, "float32": 200e9, "bfloat16": None})
    assert [r["stage"] for r in rows] == ["pretraining", "feature extraction", "finetuning"]
    assert rows[0]["gflop_s"] == pytest.approx(120.0) and rows[0]["efficiency"] == pytest.approx(0.6)
    assert efficiency_rows(compute, None)[0]["efficiency"] is None


def test_the_counter_counts_a_matmul_and_the_rate_is_positive():
    a, b = torch.randn(64, 32), torch.randn(32, 16)
    _, flops = counted(lambda: a @ b)
    assert flops == 2 * 64 * 32 * 16
    assert matmul_rate(size=128, seconds=0.05) > 0


def test_fused_attention_on_a_cpu_counts_the_products_that_the_unfused_one_does():
    """timm's ViTs and MONAI's Swin (without gradients) attend through torch's fused CPU kernel,
    which torch's counter would count as nothing."""
    q = torch.randn(4, 2, 64, 12)
    mask = torch.randn(1, 2, 64, 64)
    _, fused = counted(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask))
    _, unfused = counted(lambda: ((q @ q.transpose(-2, -1)) * 12**-0.5 + mask).softmax(-1) @ q)
    assert fused == unfused == 2 * 2 * 4 * 2 * 64 * 64 * 12


def test_data_loading_and_lock_waits_are_measured_and_reported(tmp_path):
    """Where the time below the ceiling went: each training stage's wait for the loader's next batch,
    and the time trials idled on another trial's lock (a row of its own)."""
    public = _artifact(tmp_path / "a" / "public", 4e12, 40.0)
    record = json.loads((public / "pretrain.json").read_text())
    (public / "pretrain.json").write_text(json.dumps({**record, "data_s": 8.0}))
    runs = [_run(tmp_path / "r1", {"train_flops": 3e12, "train_s": 30.0, "train_data_s": 3.0, "amp_dtype": None,
                                   "threads": 1, "lock_wait_s": 12.0}, public),
            _run(tmp_path / "r2", {"train_flops": 3e12, "train_s": 30.0, "train_data_s": 6.0, "amp_dtype": None,
                                   "threads": 1, "lock_wait_s": 0.0})]
    rows = {r["stage"]: r for r in efficiency_rows(stage_compute(runs), {"threads": 1, "float32": 200e9})}
    assert rows["pretraining"]["data_s"] == pytest.approx(8.0) and rows["pretraining"]["data_share"] == 0.2
    assert rows["finetuning"]["data_s"] == pytest.approx(9.0) and rows["finetuning"]["data_share"] == 0.15
    assert rows["waiting on locks"]["seconds"] == pytest.approx(12.0) and rows["waiting on locks"]["gflop_s"] is None
    assert list(rows)[-1] == "waiting on locks"


def test_the_loop_times_the_loader_and_a_run_records_its_lock_waits(tmp_path):
    import threading
    import time

    from bench.locks import locked, waited_s
    from bench.loop import Execution, Schedule, Stage, TrainingLoop

    class Slow:
        def __iter__(self):
            for _ in range(2):
                time.sleep(0.05)
                yield torch.randn(2, 3)

        def __len__(self):
            return 2

    class Fit(Stage):
        def __init__(self) -> None:
            self.model, self.loader = torch.nn.Linear(3, 1), Slow()

        def step(self, model, batch):
            return {"loss": model(batch).pow(2).mean()}, len(batch)

    loop = TrainingLoop(Fit(), Schedule(epochs=1, lr=1e-2, min_lr=1e-3, weight_decay=0.0, warmup_epochs=0.0),
                        Execution(torch.device("cpu"), None, torch.contiguous_format, False), progress=False)
    result = loop.run()
    assert 0.09 <= result.data_s <= result.train_s and result.history[0]["data_s"] == result.data_s

    before, held = waited_s(), threading.Event()

    def hold():
        with locked(tmp_path / "artifact"):
            held.set()
            time.sleep(0.3)

    other = threading.Thread(target=hold)
    other.start()
    held.wait()
    with locked(tmp_path / "artifact"):
        pass
    other.join()
    assert waited_s() - before >= 0.2
