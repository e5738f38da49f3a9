"""A run resumed from a per-epoch training state ends exactly where the uninterrupted run ends
(what Ray Tune's FailureConfig relies on when it retries a suite trial from its last checkpoint)."""
import io

import pandas as pd
import pytest
import torch

from bench.datasets.loading import load_data
from bench.finetune import finetune
from bench.registry import create_method
from bench.run import resolve_runs


@pytest.mark.parametrize("method", ["resnet18", "supcon"])  # supcon: random views from the global RNG
def test_resume_from_an_epoch_state_equals_the_uninterrupted_run(method):
    cfg = resolve_runs({"method": method, "regime": "scratch", "preset": "tiny", "epochs": "3", "progress": "false"})[0]
    data = load_data(cfg)
    saved = {}

    def keep_epoch_1(record, state):
        if record["epoch"] == 1:
            buffer = io.BytesIO()
            torch.save(state(), buffer)  # through bytes, as a checkpoint on disk, read back safely
            saved["state"] = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)

    whole = finetune(create_method(method, cfg), data, cfg, on_epoch=keep_epoch_1)
    resumed = finetune(create_method(method, cfg), data, cfg, resume=saved["state"])
    assert resumed.cost["resumed_at_epoch"] == 2
    assert resumed.test_metrics == whole.test_metrics
    assert [e["train_loss"] for e in resumed.epochs] == [e["train_loss"] for e in whole.epochs]
    pd.testing.assert_frame_equal(resumed.predictions, whole.predictions)
