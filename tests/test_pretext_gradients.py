"""Every pretext trains the encoder it hands on: one pretraining step at `tiny` gives a non-zero
gradient to every parameter of the encoder state a finetuning run takes from it. A pretext whose
loss can fall without moving the encoder (a decoder that restores each masked patch from its own
mask token, an encoder detached from the loss) would pass every shape check and leave `public`
identical to `scratch`."""
from __future__ import annotations

import pytest
from torch.utils.data import DataLoader

from bench.datasets.pretext import pretext_dataset
from bench.loop import seed_everything
from bench.regimes import stages
from bench.registry import create_method, get_method, list_methods
from bench.run import resolve_runs

# MONAI's TransformerBlock builds `norm_cross_attn` in every block but uses it only with cross-attention,
# which no method here enables: neither the pretext nor the finetuning model ever reads it
UNUSED_BY_ANY_FORWARD = ("norm_cross_attn",)


def _cases() -> list[tuple[str, str, str]]:
    """(method, regime, stage) for every pretraining stage a method runs with its own pretext."""
    out = {}
    for name in list_methods():
        for regime in get_method(name).regimes:
            for stage in stages(regime):
                out.setdefault((name, stage), regime)
    return [(name, regime, stage) for (name, stage), regime in out.items() if not name.startswith("_")]


@pytest.mark.parametrize(("name", "regime", "stage"), _cases(), ids=[f"{n}-{s}" for n, _, s in _cases()])
def test_one_pretext_step_reaches_every_transferred_encoder_tensor(name, regime, stage, bench_cache):
    cfg = resolve_runs({"method": name, "regime": regime, "preset": "tiny", "progress": "false"})[0]
    method = create_method(name, cfg)
    if method.pretext_data_kind(stage) is None:
        pytest.skip(f"{name} has no pretext for the {stage} stage (the real public file only)")
    seed_everything(0, True)
    dataset, _ = pretext_dataset(method, cfg, stage, seed=0)
    batch = next(iter(DataLoader(dataset, batch_size=2, shuffle=False)))
    pretext = method.make_pretext(stage).train()
    pretext.step(pretext, batch)["loss"].backward()
    # the transferred tensors share storage with the pretext's parameters (buffers are not trained)
    params = {p.data_ptr(): p for p in pretext.parameters() if p.requires_grad}
    transferred = {key: params[t.data_ptr()] for key, t in pretext.encoder_state().items()
                   if t.data_ptr() in params}
    checked = sorted(key for key in transferred if not any(part in key for part in UNUSED_BY_ANY_FORWARD))
    assert checked, f"{name}: no transferred tensor is a trainable parameter of the pretext"
    still = [key for key in checked if transferred[key].grad is None or not transferred[key].grad.abs().sum() > 0]
    assert not still, f"{name} ({stage}): {len(still)} of {len(checked)} transferred encoder parameters get no " \
                      f"gradient from the pretext loss, e.g. {sorted(still)[:4]}"
