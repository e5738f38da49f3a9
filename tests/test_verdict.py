"""The report's inference on stores written by hand with known predictions: Holm and BH against
statsmodels, one one-sided learning rule everywhere, and the verdict's rankings and sentences."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from statsmodels.stats.multitest import multipletests

from bench.cli import main
from bench.store import write_run

N_PATIENTS = 150


def _labels() -> pd.DataFrame:
    rng = np.random.default_rng(123)
    rows = [{"patient_id": f"p{p:03d}", "vertebra": f"L{v + 1}", "label": int(rng.random() < 0.25)}
            for p in range(N_PATIENTS) for v in range(4)]
    return pd.DataFrame(rows)


def _predictions(strength: float, noise_seed: int) -> pd.DataFrame:
    table = _labels()
    noise = np.random.default_rng(noise_seed).normal(0, 1, len(table))
    table["score"] = 1 / (1 + np.exp(-(strength * (table["label"] - 0.5) * 4 + noise)))
    table["prediction"] = (table["score"] >= 0.5).astype(int)
    return table


def _run(out, method, regime, preds, seed=0, protocol="linear", val_auc=0.9, data="hand"):
    from bench.metrics import binary_metrics

    cfg = OmegaConf.create({"method": method, "regime": regime, "seed": seed, "preset": "small", "task": "fracture",
                            "train_fraction": 1.0, "protocol": protocol, "suite": "hand", "model": {},
                            "crop_size": 48})
    metrics = {"test": binary_metrics(preds["label"], preds["score"]),
               "val": {"auc": val_auc, "n": 400, "n_positive": 100}, "epochs": [],
               "cost": {"s_per_epoch": 1.0, "train_s": 1.0, "n_params": 10}, "pretraining": {},
               "data": {"name": data, "fingerprint": "f" * 64, "input": {"crop_size": 48, "spacing_mm": 2.0}}}
    write_run(out / "hand" / f"{method}-{regime}-{protocol}-s{seed}", cfg, metrics, preds,
              {"started": "2026-01-01T00:00:00"})


def _report(tmp_path, out) -> str:
    assert main(["report", str(out / "hand"), f"out={tmp_path / 'rep'}", "bootstrap=200"]) == 0
    return (tmp_path / "rep" / "index.html").read_text()


def _text(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", re.sub(r"<img[^>]*>", "", html)))


def _verdict_rows(html: str, title: str) -> dict[str, dict[str, str]]:
    """The ranking table under the verdict heading `title`: cell -> its columns."""
    block = html.split(f"<h3>{title}</h3>", 1)[1].split("</table>", 1)[0]
    rows = {}
    for tr in re.findall(r"<tr><td class=\"name( top)?\">([^<]+)</td>(.*?)</tr>", block, re.S):
        values = re.findall(r"<td>([^<]*)</td>", tr[2])
        rows[tr[1]] = {"top": bool(tr[0]), "auc": values[0], "seeds": values[1], "p_best": float(values[2])}
    return rows


def test_holm_and_bh_equal_statsmodels_and_bold_follows_the_adjusted_p():
    from bench.reports.build import _effect_rows
    from bench.reports.stats import adjust

    p = [0.001, 0.01, 0.02, 0.04, 0.3]
    holm, bh = adjust(p)
    np.testing.assert_allclose(holm, multipletests(p, method="holm")[1])
    np.testing.assert_allclose(bh, multipletests(p, method="fdr_bh")[1])
    effect = pd.DataFrame({"method": ["a"] * 5, "variant": [""] * 5, "protocol": ["linear"] * 5,
                           "geometry": ["48^3 at 2.00 mm"] * 5, "regime": list("vwxyz"), "auc_pre": 0.8,
                           "auc_scratch": 0.7, "diff": 0.1, "lo": 0.0, "hi": 0.2, "p": p, "n": 600,
                           "p_holm": holm, "q_bh": bh, "excluded": ""})
    bold = [r["significant"] for r in _effect_rows(effect, False)]
    assert bold == [bool(h < 0.05) for h in holm] == [True, True, False, False, False]  # raw p says 4


def test_effect_table_adjusts_within_the_family_of_learned_pairs(tmp_path):
    from bench.reports.collect import load_runs
    from bench.reports.stats import pretraining_effect

    out = tmp_path / "runs"
    for method, strengths in {"m1": (0.4, 0.8), "m2": (0.4, 0.45), "m3": (0.4, 1.0)}.items():
        _run(out, method, "scratch", _predictions(strengths[0], 1), val_auc=0.5 if method == "m3" else 0.9)
        _run(out, method, "vertebrae", _predictions(strengths[1], 2))
    runs = load_runs([out])
    runs["not_learned"] = ["" if not (r.method == "m3" and r.regime == "scratch") else "val AUC not above chance"
                           for r in runs.itertuples()]
    effect = pretraining_effect(runs, 100).set_index("method")
    family = effect.loc[["m1", "m2"]]
    np.testing.assert_allclose(family["p_holm"], multipletests(family["p"], method="holm")[1])
    np.testing.assert_allclose(family["q_bh"], multipletests(family["p"], method="fdr_bh")[1])
    assert effect.loc["m3", "excluded"] == "scratch did not learn" and np.isnan(effect.loc["m3", "p_holm"])


def test_below_chance_is_worse_than_chance_unranked_and_its_effect_greyed(tmp_path):
    out = tmp_path / "runs"
    for seed in range(3):
        _run(out, "good", "scratch", _predictions(0.8, 10 + seed), seed=seed)
        _run(out, "good", "vertebrae", _predictions(1.2, 20 + seed), seed=seed)
        _run(out, "bad", "scratch", _predictions(0.6, 30 + seed), seed=seed, val_auc=0.40)  # far below 0.5
        _run(out, "bad", "vertebrae", _predictions(1.0, 40 + seed), seed=seed)
    html = _report(tmp_path, out)
    text = _text(html)
    assert "worse than chance: validation AUC 0.400" in text
    ranked = _verdict_rows(html, "linear")
    assert "bad / scratch" not in ranked and {"good / scratch", "good / vertebrae", "bad / vertebrae"} <= set(ranked)
    effect = html.split("<h2>Does pretraining help?</h2>", 1)[1].split("</table>", 1)[0]
    bad_row = next(tr for tr in effect.split("<tr")[1:] if ">bad<" in tr)
    assert 'class="excluded"' in bad_row and "scratch did not learn" in bad_row and "best" not in bad_row
    assert "bad: under linear, nothing can be said (scratch did not learn)" in text


def test_one_sided_rule_keeps_a_model_clearly_above_chance_and_drops_one_at_chance():
    from bench.reports.stats import did_not_learn

    preds = _predictions(1.0, 0)
    run = lambda auc: pd.Series({"val_auc": auc, "val_n": 400, "val_n_positive": 100})  # noqa: E731
    assert did_not_learn(run(0.57), preds) == ""  # lower bound above 0.5 one-sided (two-sided it was not)
    assert "not above chance" in did_not_learn(run(0.54), preds)
    assert did_not_learn(run(0.40), preds).startswith("worse than chance")


def test_a_clear_winner_has_p_best_near_one_and_is_alone_in_the_top_set(tmp_path):
    out = tmp_path / "runs"
    for seed in range(3):
        _run(out, "strong", "vertebrae", _predictions(2.0, 100 + seed), seed=seed)
        _run(out, "weak", "scratch", _predictions(0.5, 200 + seed), seed=seed)
        _run(out, "weaker", "scratch", _predictions(0.3, 300 + seed), seed=seed)
    html = _report(tmp_path, out)
    rows = _verdict_rows(html, "linear")
    assert rows["strong / vertebrae"]["p_best"] >= 0.99 and rows["strong / vertebrae"]["top"]
    assert [c for c, r in rows.items() if r["top"]] == ["strong / vertebrae"]
    text = _text(html)
    assert "linear: 1 of 3 cells cannot be told apart from the top" in text
    assert "no ranking is claimed" not in text.lower()


def test_two_identical_methods_share_the_top_set_and_p_best(tmp_path):
    out = tmp_path / "runs"
    for seed in range(3):
        preds = _predictions(1.5, 400 + seed)
        _run(out, "twin_a", "scratch", preds, seed=seed)
        _run(out, "twin_b", "scratch", preds, seed=seed)
        _run(out, "other", "scratch", _predictions(0.3, 500 + seed), seed=seed)
    rows = _verdict_rows(_report(tmp_path, out), "linear")
    assert rows["twin_a / scratch"]["top"] and rows["twin_b / scratch"]["top"] and not rows["other / scratch"]["top"]
    # each cell's seeds are drawn independently, so the twins split P(best) up to the draws' noise
    # (sd about 0.035 at 200 replicates)
    a, b = rows["twin_a / scratch"]["p_best"], rows["twin_b / scratch"]["p_best"]
    assert a == pytest.approx(0.5, abs=0.12) and b == pytest.approx(0.5, abs=0.12)
    assert a + b == pytest.approx(1, abs=0.01)


def test_one_seed_claims_no_ranking_and_synthetic_data_is_called_a_rehearsal(tmp_path):
    out = tmp_path / "runs"
    _run(out, "strong", "vertebrae", _predictions(2.0, 1), data="synthetic-abc")
    _run(out, "weak", "scratch", _predictions(0.5, 2), data="synthetic-abc")
    text = _text(_report(tmp_path, out))
    assert "No ranking is claimed" in text and "linear: no ranking is claimed" in text
    assert "rehearsal of the protocol" in text and "does not rank pretraining for real CT" in text
    assert text.index("Verdict") < text.index("Other runs")  # the verdict comes first


def test_cells_of_different_input_geometry_never_share_a_table_or_a_test(tmp_path):
    from bench.metrics import binary_metrics

    out = tmp_path / "runs"
    _run(out, "a48", "scratch", _predictions(1.0, 1))
    _run(out, "b48", "scratch", _predictions(0.8, 2))
    preds = _predictions(2.0, 3)
    cfg = OmegaConf.create({"method": "c32", "regime": "scratch", "seed": 0, "preset": "small", "task": "fracture",
                            "protocol": "linear", "suite": "hand", "model": {}, "crop_size": 32})
    metrics = {"test": binary_metrics(preds["label"], preds["score"]), "val": {"auc": 0.9, "n": 400, "n_positive": 100},
               "epochs": [], "cost": {}, "pretraining": {},
               "data": {"name": "hand", "fingerprint": "f" * 64, "input": {"crop_size": 32, "spacing_mm": 3.0}}}
    write_run(out / "hand" / "c32-scratch-linear-s0", cfg, metrics, preds, {"started": "2026-01-01T00:00:00"})
    html = _report(tmp_path, out)
    t48 = html.split("input 48^3 at 2.00 mm)</h2>", 1)[1].split("</table>", 1)[0]
    t32 = html.split("input 32^3 at 3.00 mm)</h2>", 1)[1].split("</table>", 1)[0]
    assert ">a48<" in t48 and ">b48<" in t48 and ">c32<" not in t48
    assert ">c32<" in t32 and ">a48<" not in t32
    assert "c32 / scratch" not in _verdict_rows(html, "linear, input 48^3 at 2.00 mm")


def test_runs_whose_configs_differ_beyond_the_seed_never_share_a_cell(tmp_path):
    """A `variant=` run, or one that changed any key but the seed and where it ran, is its own cell:
    the report never averages it with the default run of the same method and seed."""
    from bench.metrics import binary_metrics

    out = tmp_path / "runs"
    for folder, extra in (("default", {}), ("lowlr", {"lr": 1e-7}), ("named", {"variant": "lowlr", "lr": 1e-7}),
                          ("elsewhere", {"threads": 1, "out": "x", "device": "cpu"})):
        preds = _predictions(1.0 if folder in ("default", "elsewhere") else 0.2, len(folder))
        cfg = OmegaConf.create({"method": "resnet18", "regime": "scratch", "seed": 0, "preset": "tiny",
                                "protocol": "finetune", "suite": folder, "model": {}, "lr": 1e-3, **extra})
        metrics = {"test": binary_metrics(preds["label"], preds["score"]),
                   "val": {"auc": 0.9, "n": 400, "n_positive": 100}, "epochs": [], "cost": {}, "pretraining": {},
                   "data": {"name": "hand", "fingerprint": "f" * 64}}
        write_run(out / folder / "resnet18-scratch-s0", cfg, metrics, preds, {"started": "2026-01-01T00:00:00"})
    from bench.reports.collect import load_runs

    runs = load_runs([out])
    cells = runs.groupby("variant")["folder"].apply(lambda f: sorted(p.split("/")[-2] for p in f)).to_dict()
    assert cells.pop("lowlr") == ["named"]
    assert sorted(cells.values()) == [["default", "elsewhere"], ["lowlr"]]  # same config but where it ran: seeds
    assert all(v.startswith("cfg ") for v in cells)
    assert main(["report", str(out), f"out={tmp_path / 'rep'}", "bootstrap=50"]) == 0
    html = (tmp_path / "rep" / "index.html").read_text()
    assert "runs that differ in anything else are separate cells, named by a digest of their config" in html
