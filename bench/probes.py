"""Frozen-feature protocols: `linear` (logistic regression) and `knn` (weighted cosine kNN) on the
features of the initialised encoder, which is never trained here.

Features come from the encoder in eval mode on un-augmented inputs (the evaluation views; a
multi-view method's features are averaged over its views), in fp32 whatever the run's autocast
(`feature_execution`). They are extracted once per encoder
state, data and view settings and cached (numpy files written by this suite, no pickle), so both
protocols of one initialisation share them. The probes see training labels to fit, validation
labels to choose their hyperparameter, and never the test labels.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch import nn

from bench.datasets.base import VertebraSet
from bench.errors import BenchError
from bench.evaluation import (
    NUM_CLASSES,
    ProtocolResult,
    eval_loader,
    forward_views,
    predictions_table,
    split_parts,
    targets,
    task_metrics,
    training_used,
)
from bench.locks import locked
from bench.loop import Execution, seed_everything


def _state_digest(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for key, tensor in module.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def feature_execution(cfg: DictConfig, method: Any) -> Execution:
    """Where features are extracted: the run's device and memory format, always in fp32, whatever the
    run's autocast. A frozen encoder's features can differ between crops by less than bf16 rounds
    (random and lightly pretrained encoders especially), so features under bf16 autocast measure the
    rounding: the probes would rank encoders differently on CPUs with and without bf16 (README)."""
    return dataclasses.replace(Execution.of(cfg, method), dtype=None, note="")


def feature_key(method: Any, cfg: DictConfig, encoder: nn.Module, data: VertebraSet) -> str:
    """What the features depend on: the encoder's tensors, the data and how inputs are made."""
    inputs = {"format": method.input_format, "crop_size": cfg.crop_size,
              "dtype": feature_execution(cfg, method).dtype_name,
              "views": OmegaConf.to_container(cfg.views, resolve=True), "view_options": method.view_options(),
              "encoder": _state_digest(encoder), "data": data.fingerprint(), "task": cfg.task}
    return hashlib.sha256(repr(sorted(inputs.items())).encode()).hexdigest()[:24]


@torch.no_grad()
def extract(method: Any, cfg: DictConfig, encoder: nn.Module, part: VertebraSet, execution: Execution,
            flops: list[float] | None = None) -> np.ndarray:
    """(N, F) float32 features of a split: eval mode, evaluation inputs, views averaged. When given,
    `flops` gets the split's FLOPs appended (the first batch's count per sample, times the samples)."""
    from bench.flops import counted

    encoder = encoder.to(execution.device, memory_format=execution.memory_format).eval()
    out, per_sample = [], None

    def forward(x: torch.Tensor) -> np.ndarray:
        with execution.autocast():
            return forward_views(encoder, execution.to(x)).float().cpu().numpy()

    for x, _ in eval_loader(method, cfg, part, execution):
        if per_sample is None and flops is not None:
            batch, count = counted(lambda x=x: forward(x))
            per_sample = count / len(x)
            out.append(batch)
        else:
            out.append(forward(x))
    if flops is not None:
        flops.append((per_sample or 0.0) * len(part.table))
    return np.concatenate(out).astype(np.float32)


def features(method: Any, cfg: DictConfig, model: nn.Module, data: VertebraSet,
             parts: dict[str, VertebraSet]) -> tuple[dict[str, np.ndarray], bool, float, float]:
    """The features of every split, from the cache or extracted (and cached); (features, cached,
    seconds, FLOPs), the last two 0 when cached."""
    from bench.datasets.loading import cache_root

    encoder = model.encoder
    path = cache_root(cfg) / "features" / f"{feature_key(method, cfg, encoder, data)}.npz"
    with locked(path):  # concurrent trials of one initialisation extract once
        if path.is_file():
            with np.load(path, allow_pickle=False) as stored:
                return {k: stored[k] for k in parts}, True, 0.0, 0.0
        return _extract_all(method, cfg, encoder, parts, path)


def _extract_all(method: Any, cfg: DictConfig, encoder: nn.Module, parts: dict[str, VertebraSet],
                 path: Path) -> tuple[dict[str, np.ndarray], bool, float, float]:
    t0 = time.perf_counter()
    execution, flops = feature_execution(cfg, method), []
    out = {name: extract(method, cfg, encoder, part, execution, flops) for name, part in parts.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **out)
    os.replace(tmp, path)
    return out, False, time.perf_counter() - t0, sum(flops)


def _scores_metric(cfg: DictConfig, y: np.ndarray, probs: np.ndarray) -> float:
    """What a probe's hyperparameter maximises on validation: AUC (macro-F1 for grading)."""
    value = task_metrics(cfg, y, probs)["macro_f1" if cfg.task == "grade" else "auc"]
    return -1.0 if np.isnan(value) else value


def fit_linear(cfg: DictConfig, x: dict[str, np.ndarray],
               y: dict[str, np.ndarray]) -> tuple[StandardScaler, LogisticRegression, dict[str, Any]]:
    """Standardised training features, balanced logistic regression, C chosen on validation."""
    scaler = StandardScaler().fit(x["train"])
    z = {k: scaler.transform(v) for k, v in x.items() if k in ("train", "val")}
    trials = []
    for c in cfg.probe.c_grid:
        clf = LogisticRegression(C=c, class_weight="balanced", max_iter=cfg.probe.max_iter)
        clf.fit(z["train"], y["train"])
        trials.append((_scores_metric(cfg, y["val"], clf.predict_proba(z["val"])), -c, clf))
    score, neg_c, clf = max(trials, key=lambda t: t[:2])  # ties: the stronger regularisation
    return scaler, clf, {"C": -neg_c, "val_score": score, "val_score_by_C": {str(-t[1]): t[0] for t in trials}}


def _linear_layers(head: nn.Module, method: Any) -> list[nn.Module]:
    """The head's layers, when they are one linear layer after eval-mode identities (dropout)."""
    layers = list(head) if isinstance(head, nn.Sequential) else [head]
    if isinstance(layers[-1], nn.Linear) and all(isinstance(m, (nn.Dropout, nn.Identity)) for m in layers[:-1]):
        return layers
    raise BenchError(f"bad value for 'head_init': linear_probe; method '{method.name}' has a head that is not one "
                     f"linear layer ({type(head).__name__}), expected head_init=random")


def probe_head_layout(head: nn.Module, method: Any) -> nn.Sequential:
    """The head of a `head_init=linear_probe` classifier, untrained: the probe's BatchNorm (no
    affine parameters) before the method's own head layers."""
    layers = _linear_layers(head, method)
    return nn.Sequential(nn.BatchNorm1d(layers[-1].in_features, affine=False, eps=1e-6), *layers)


def probe_head(scaler: StandardScaler, clf: LogisticRegression, head: nn.Module, method: Any) -> nn.Sequential:
    """The fitted probe as the classifier head: a BatchNorm without affine parameters holding the
    probe's standardisation (MAE's linear-probe head), then the head's own layers with the probe's
    weights in its linear layer. A binary probe's single logit is split as +-1/2 over two classes, so
    the head's probabilities equal the probe's. In training the norm standardises by batch statistics,
    so the logits keep the probe's scale while the encoder's features move."""
    out = probe_head_layout(head, method)
    norm, linear = out[0], out[-1]
    coef, bias = clf.coef_, clf.intercept_
    if len(clf.classes_) == 2:
        coef, bias = np.stack([-coef[0], coef[0]]) / 2, np.array([-bias[0], bias[0]]) / 2
    if coef.shape != tuple(linear.weight.shape):
        raise BenchError(f"head_init=linear_probe: the probe has {coef.shape[0]} classes, the head "
                         f"{linear.weight.shape[0]}; expected the training split to hold every class")
    with torch.no_grad():
        norm.running_mean.copy_(torch.from_numpy(scaler.mean_))
        norm.running_var.copy_(torch.from_numpy(scaler.scale_**2 - 1e-6).clamp_min(0))
        linear.weight.copy_(torch.from_numpy(coef))
        linear.bias.copy_(torch.from_numpy(bias))
    return out


def init_head_from_probe(method: Any, data: VertebraSet, cfg: DictConfig, model: nn.Module) -> dict[str, Any]:
    """Replace the classifier head by the `linear` protocol's probe of the initialised encoder (LP-FT:
    finetuning starts from a trained decision rule on the frozen features). The features are the
    cached ones both probes use; only training and validation labels are read."""
    _linear_layers(model.head, method)  # fails before any feature is extracted
    train, val, test = split_parts(data, cfg)
    x, cached, extract_s, extract_flops = features(method, cfg, model, data, {"train": train, "val": val, "test": test})
    scaler, clf, fitted = fit_linear(cfg, x, {"train": targets(train, cfg), "val": targets(val, cfg)})
    model.head = probe_head(scaler, clf, model.head, method)
    return {"from": "linear_probe", "C": fitted["C"], "probe_val_score": fitted["val_score"],
            "extract_s": extract_s, "extract_flops": extract_flops, "features_cached": cached}


def knn_probs(bank: np.ndarray, bank_y: np.ndarray, query: np.ndarray, classes: int, k: int,
              temperature: float, balanced: bool = False) -> np.ndarray:
    """Weighted cosine kNN (the DINO / solo-learn rule): the k most similar bank rows vote with
    weight exp(similarity / T); class probabilities are the normalised votes. `balanced` divides
    each class's votes by its share of the bank first, so a rare class (12 % fractures) can win a
    vote its neighbours favour beyond its prior, as a class-weighted loss does in training."""
    bank_t = torch.nn.functional.normalize(torch.from_numpy(bank).double(), dim=1)
    query_t = torch.nn.functional.normalize(torch.from_numpy(query).double(), dim=1)
    labels = torch.tensor(np.asarray(bank_y, dtype=np.int64))
    sims, idx = (query_t @ bank_t.T).topk(min(k, len(bank)), dim=1)
    votes = torch.zeros(len(query), classes, dtype=torch.float64)
    votes.scatter_add_(1, labels[idx], (sims / temperature).exp())
    if balanced:
        share = torch.bincount(labels, minlength=classes).double() / len(labels)
        votes = votes / share.clamp_min(1e-12)
    return (votes / votes.sum(dim=1, keepdim=True)).numpy()


def probe(protocol: str, method: Any, data: VertebraSet, cfg: DictConfig, model: nn.Module,
          **_: Any) -> ProtocolResult:
    """Evaluate the frozen encoder of `model` with the `linear` or `knn` protocol."""
    seed_everything(cfg.seed, cfg.deterministic)
    train, val, test = split_parts(data, cfg)
    parts = {"train": train, "val": val, "test": test}
    x, cached, extract_s, extract_flops = features(method, cfg, model, data, parts)
    y = {name: targets(part, cfg) for name, part in parts.items() if name != "test"}
    t0 = time.perf_counter()
    if protocol == "linear":
        scaler, clf, fitted = fit_linear(cfg, x, y)
        val_probs, test_probs = (clf.predict_proba(scaler.transform(x[k])) for k in ("val", "test"))
    else:
        classes, p = NUM_CLASSES[cfg.task], cfg.probe
        val_probs, test_probs = (knn_probs(x["train"], y["train"], x[k], classes, p.knn_k, p.knn_temperature,
                                           p.knn_balanced) for k in ("val", "test"))
        fitted = {"k": p.knn_k, "temperature": p.knn_temperature, "balanced": p.knn_balanced}
    cost = {"train_s": time.perf_counter() - t0, "extract_s": extract_s, "extract_flops": extract_flops,
            "threads": torch.get_num_threads(), "features_cached": cached,
            "n_params": sum(q.numel() for q in model.encoder.parameters()), "feature_dim": int(x["train"].shape[1])}
    return ProtocolResult(None, task_metrics(cfg, targets(test, cfg), test_probs),
                          task_metrics(cfg, targets(val, cfg), val_probs), predictions_table(cfg, test, test_probs),
                          [], cost, {"train_used": training_used(cfg, train), "probe": fitted})
