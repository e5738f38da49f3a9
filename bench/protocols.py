"""Evaluation protocols: how an initialised classifier is turned into test predictions.

- `finetune`: the paper's protocol, the whole network trained (bench.finetune);
- `linear`: logistic regression on the frozen encoder's features (bench.probes);
- `knn`: weighted cosine kNN on the same features (bench.probes).

Every protocol takes (method, data, cfg, model, on_epoch=None, resume=None) and returns a
`bench.evaluation.ProtocolResult`, so the run chain and the results store treat them alike.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

PROTOCOLS: dict[str, str] = {
    "finetune": "train the whole classifier, best validation checkpoint (the paper's protocol)",
    "linear": "logistic regression on frozen encoder features, C chosen on validation",
    "knn": "weighted cosine kNN on frozen encoder features",
}


def protocol(name: str) -> Callable[..., Any]:
    if name == "finetune":
        from bench.finetune import finetune

        return finetune
    from bench.probes import probe

    return partial(probe, name)
