"""compare.py: several runs side by side, and the paired differences between rows with a cluster-bootstrap interval,
on pinned numbers that can be checked by hand."""
import json

import numpy as np
import pytest

from tools import compare


def test_compare_puts_runs_side_by_side(tmp_path, capsys):
    for seed, rates in ((0, (0.2, 0.4)), (1, (0.4, 0.8))):
        d = tmp_path / f"s{seed}"
        d.mkdir()
        (d / "results.json").write_text(json.dumps({"seed": seed, "rows": [
            {"row": "base", "rate": rates[0], "paper": "32.7", "metrics": {"sampled": rates[0] / 2}},
            {"row": "seal", "rate": rates[1], "paper": "47.0", "metrics": {}}]}))
    out = compare.compare([tmp_path / "s0", tmp_path / "s1"])["rows"]
    assert out["base"]["mean"] == pytest.approx(30) and out["seal"]["sd"] == pytest.approx(28.284, abs=1e-3)
    assert out["base"]["metrics"]["sampled"]["mean"] == pytest.approx(0.15)
    assert out["base"]["metrics"]["sampled"]["sd"] == pytest.approx(0.0707, abs=1e-4)
    assert out["seal"]["metrics"] == {}  # a metric a row never carried is not invented
    printed = capsys.readouterr().out
    assert "seed 1" in printed and "0.150+-0.071" in printed


def test_a_constant_difference_has_a_zero_width_interval_at_that_value():
    assert compare.cluster_bootstrap(np.full((8, 3), 0.125)) == pytest.approx((0.125, 0.125, 0.125))


def test_items_are_resampled_with_their_seeds():
    """Each item's seeds cancel (+1, -1): every resample of whole items has mean 0. Resampling the cells one by one
    would not."""
    mean, lo, hi = compare.cluster_bootstrap([[1, -1], [1, -1], [1, -1]])
    assert (mean, lo, hi) == (0, 0, 0)


def test_two_items_give_the_hand_computed_interval():
    """Differences 0 and 1: a resample of 2 items has mean 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4, so the
    2.5% and 97.5% quantiles are 0 and 1."""
    assert compare.cluster_bootstrap([[0.0], [1.0]]) == (0.5, 0.0, 1.0)
    # at the 80% level the quantiles are 10% and 90%: still 0 and 1; at 40%, 30% and 70%: both 0.5
    assert compare.cluster_bootstrap([[0.0], [1.0]], level=0.8) == (0.5, 0.0, 1.0)
    assert compare.cluster_bootstrap([[0.0], [1.0]], level=0.4) == (0.5, 0.5, 0.5)


def write_run(d, seed, scores, key="score"):
    """A run folder: results.json and evals.jsonl, scores {row: {item: [(score, sampled) per k]}}, the score under
    `key` ("reward" in a record older than seal.RECORDS 2)."""
    d.mkdir()
    (d / "results.json").write_text(json.dumps({"seed": seed, "rows": [
        {"row": row, "rate": 0.0, "paper": "-", "metrics": {}} for row in scores]}))
    lines = [{"phase": row, "item": it, "k": k, key: r, "sampled": s}
             for row, items in scores.items() for it, ks in items.items() for k, (r, s) in enumerate(ks)]
    lines.append({"phase": "cpt", "item": "all", "k": 0, key: 0.9, "weight": 2})  # pooled: no item
    (d / "evals.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_rows_are_paired_by_item_and_seed_from_the_records(tmp_path, capsys):
    """SEAL is the passage row + 0.2 on every item of both seeds (score), so its interval is [0.2, 0.2]; against
    self_edit it is +0.4 on e1 and 0 on e2 in both seeds; a self-edit row with 2 samples is their mean per item."""
    for seed, shift in ((0, 0.0), (1, 0.1)):  # the seed moves every row alike: pairing removes it
        write_run(tmp_path / f"s{seed}", seed, {
            "passage": {"e1": [(0.2 + shift, 0.1)], "e2": [(0.4 + shift, 0.3)]},
            "self_edit": {"e1": [(0.0 + shift, 0.1), (0.0 + shift, 0.1)], "e2": [(0.4 + shift, 0.2), (0.8 + shift, 0.2)]},
            "seal": {"e1": [(0.4 + shift, 0.3)], "e2": [(0.6 + shift, 0.3)]}}, key=("score", "reward")[seed])
    out = compare.compare([tmp_path / "s0", tmp_path / "s1"])["paired"]
    seal = out["score"]["passage"]["seal"]
    assert (seal["mean"], seal["lo"], seal["hi"], seal["items"], seal["seeds"]) == pytest.approx((0.2, 0.2, 0.2, 2, 2))
    # against self_edit: e1 +0.4, e2 0.0 (its two samples' mean is 0.6): resamples of 2 items give 0, 0.2 or 0.4
    assert (out["score"]["self_edit"]["seal"]["mean"], out["score"]["self_edit"]["seal"]["lo"],
            out["score"]["self_edit"]["seal"]["hi"]) == pytest.approx((0.2, 0.0, 0.4))
    assert out["sampled"]["passage"]["seal"]["mean"] == pytest.approx(0.1)
    assert "cpt" not in out["score"]["passage"] and "passage" not in out["score"]["passage"]
    assert "+0.200 [+0.200, +0.200] 2x2" in capsys.readouterr().out


def test_items_keeps_the_first_n_items_of_the_paired_differences(tmp_path):
    """--items=1 keeps e1 only (+0.4 against self_edit in both seeds), where all items give the mean of +0.4 and 0."""
    for seed in (0, 1):
        write_run(tmp_path / f"s{seed}", seed, {"self_edit": {"e1": [(0.0, 0.1)], "e2": [(0.4, 0.2)]},
                                                "seal": {"e1": [(0.4, 0.3)], "e2": [(0.4, 0.3)]}})
    runs = [tmp_path / "s0", tmp_path / "s1"]
    first = compare.compare(runs, max_items=1)["paired"]["score"]["self_edit"]["seal"]
    every = compare.compare(runs)["paired"]["score"]["self_edit"]["seal"]
    assert (first["mean"], first["lo"], first["hi"], first["items"]) == pytest.approx((0.4, 0.4, 0.4, 1))
    assert (every["mean"], every["items"]) == pytest.approx((0.2, 2))


def test_items_needed_is_the_count_whose_half_width_reaches_the_mean():
    """Items' seed means 0.1 and 0.3 (two seeds each): mean 0.2, sd 0.1414, so 1.96 * 0.1414 / sqrt(n) <= 0.2 needs
    n >= 1.92, i.e. 2 items; ten times the spread needs 100x the items. A mean of 0 or one item has no answer."""
    assert compare.items_needed([[0.0, 0.2], [0.3, 0.3]]) == 2
    assert compare.items_needed([[0.2 - 1.0, 0.2 - 1.0], [0.2 + 1.0, 0.2 + 1.0]]) == 193  # (1.96 * 1.4142 / 0.2)^2 = 192.1
    assert compare.items_needed([[-0.1], [0.1]]) is None
    assert compare.items_needed([[0.4, 0.2]]) is None
