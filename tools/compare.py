"""
Several runs of one experiment (seeds) side by side: each row's headline rate per seed with the mean and the sample
sd over seeds, then every extra metric the rows carry (knowledge's sampled accuracy, answer coverage, ...) as mean
+- sd (from results.json). Then paired differences between rows, from each evaluation's record (evals*.jsonl): for
each row and each reference row (--against), the mean difference over the same items (passages, tasks) of the same
runs, with a 95% cluster-bootstrap interval that resamples items, each with all its seeds' differences, and ~N: how
many items an interval would need to exclude 0 if the mean held (`items_needed`, what a longer run would have to buy).

    python tools/compare.py runs/kp-s0 runs/kp-s1 runs/kp-s2
    python tools/compare.py --against=base runs/arc-s0 runs/arc-s1          # ARC: against the base policy's row
    python tools/compare.py --items=8 runs/kp-s0 runs/kp-s1 runs/kp-s2      # the paired part on the first 8 items

--items=N keeps the first N items (sorted names: e000..e007 are the first 8 evaluation passages) in the paired
differences, so one set of runs shows how an interval's width shrinks with the number of items.

Pairing removes what two rows share: the item's difficulty and the run's seed. Inner-loop seeds are shared only
where the domain seeds an evaluation by its item (ARC, docs/arc.md); knowledge draws one per self-edit, so its
rows differ by their inner loops' noise too, and the interval includes it.
"""
import json
import sys
from pathlib import Path

import numpy as np

AGAINST = "passage,self_edit"   # knowledge: the passage alone, the base policy's self-edits (docs/knowledge.md)
MEASURES = {"score": "the table's score (knowledge: greedy accuracy by --grader, lenient in the presets)",
            "sampled": "accuracy over answers sampled at T=1 (knowledge --answer_samples)"}
RESAMPLES, LEVEL, RNG_SEED = 10_000, 0.95, 0


def compare(dirs, against=AGAINST, max_items=0):
    """The headline rate of every row, per seed, with the mean and the sample sd over seeds; then each extra metric
    the rows carry (a domain's `metrics`, e.g. knowledge's sampled accuracy) as mean +- sd over seeds; then the
    paired differences (`paired`)."""
    results = [json.loads((Path(d) / "results.json").read_text()) for d in dirs]
    keys = list(dict.fromkeys(r["row"] for res in results for r in res["rows"]))
    row_of = lambda res, key: next((r for r in res["rows"] if r["row"] == key), None)
    print(f"{'row':<12}" + "".join(f"{'seed ' + str(res['seed']):>12}" for res in results) + f"{'mean':>9}{'sd':>7}"
          f"{'paper':>18}")
    out = {}
    for key in keys:
        rates = [row_of(res, key)["rate"] * 100 if row_of(res, key) else None for res in results]
        mean, sd = mean_sd([x for x in rates if x is not None])
        paper = next(r["paper"] for res in results for r in res["rows"] if r["row"] == key)
        out[key] = {"rates": rates, "mean": mean, "sd": sd, "paper": paper, "metrics": {}}
        print(f"{key:<12}" + "".join(f"{x:>11.1f}%" if x is not None else f"{'-':>12}" for x in rates)
              + f"{mean:>8.1f}%{sd:>7.1f}{paper:>18}")
    names = list(dict.fromkeys(k for res in results for r in res["rows"] for k in r.get("metrics") or {}))
    if names:
        print(f"\n{'row':<12}" + "".join(f"{n:>16}" for n in names) + "   (mean +- sd over seeds)")
    for key in keys:
        line = f"{key:<12}"
        for n in names:
            got = [row_of(res, key)["metrics"][n] for res in results
                   if row_of(res, key) and n in (row_of(res, key).get("metrics") or {})]
            if got:
                out[key]["metrics"][n] = dict(zip(("mean", "sd"), mean_sd(got)), values=got)
            line += f"{'%.3f+-%.3f' % mean_sd(got):>16}" if got else f"{'-':>16}"
        if names:
            print(line)
    return {"rows": out, "paired": paired(dirs, against.split(","), keys, max_items)}


def mean_sd(xs):
    """The mean and the sample standard deviation (0 for a single value)."""
    mean = sum(xs) / len(xs)
    return mean, (sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0


# -----------------------------------------------------------------------------
# Paired differences


def item_scores(run_dir) -> dict:
    """{measure: {row: {item: score}}} from a run folder's evaluation records: each item's mean over its self-edits
    (k). A pooled record (item "all", knowledge's cpt row) has no per-item score and is left out."""
    recs = {}
    for f in sorted(Path(run_dir).glob("evals*.jsonl")):
        for line in f.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            r.setdefault("score", r.get("reward"))  # a record older than seal.RECORDS 2 held its score as "reward"
            recs[(r["phase"], r["item"], r["k"])] = r
    sums = {}
    for (row, item, _), r in recs.items():
        for m in MEASURES:
            if item != "all" and isinstance(r.get(m), (int, float)):
                sums.setdefault(m, {}).setdefault(row, {}).setdefault(item, []).append(r[m])
    return {m: {row: {it: sum(v) / len(v) for it, v in items.items()} for row, items in rows.items()}
            for m, rows in sums.items()}


def cluster_bootstrap(diffs, resamples=RESAMPLES, level=LEVEL, seed=RNG_SEED):
    """diffs: (items, seeds) paired differences. The mean, and the percentile interval of the mean over `resamples`
    resamples of the items with replacement, each resampled item bringing all its seeds' differences (the seeds of
    one item are not independent: its difficulty is in all of them)."""
    d = np.asarray(diffs, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(d), size=(resamples, len(d)))
    means = d[idx].mean(axis=(1, 2))
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(d.mean()), float(lo), float(hi)


def items_needed(diffs, z=1.96):
    """How many items (at the same seeds) a normal-approximation interval needs before its half-width, z * sd / sqrt(n),
    falls to the observed mean difference, so that the interval would exclude 0 if the mean held. sd is over items of
    each item's mean over seeds. None where the mean is 0 or a single item gives no sd."""
    per_item = np.asarray(diffs, dtype=np.float64).mean(axis=1)
    if len(per_item) < 2 or abs(per_item.mean()) < 1e-9:  # a mean of 0 up to rounding needs every item there is
        return None
    return int(np.ceil((z * per_item.std(ddof=1) / abs(per_item.mean())) ** 2))


def cell(c):
    return "%+.3f [%+.3f, %+.3f] %dx%d ~%s" % (c["mean"], c["lo"], c["hi"], c["items"], c["seeds"], c["needed"] or "-")


def paired(dirs, against, rows, max_items=0):
    """For each measure, each row against each reference row: the differences over the items both rows have in the
    runs that hold both (the first `max_items` of them, 0: all), their mean and cluster-bootstrap interval.
    {measure: {ref: {row: {...}}}}."""
    scores = [item_scores(d) for d in dirs]
    out = {}
    for m, what in MEASURES.items():
        refs = [ref for ref in against if any(ref in s.get(m, {}) for s in scores)]
        table = {}
        for ref in refs:
            for row in rows:
                both = [s[m] for s in scores if row != ref and row in s.get(m, {}) and ref in s.get(m, {})]
                items = sorted(set.intersection(*(set(b[row]) & set(b[ref]) for b in both))) if both else []
                items = items[:max_items or None]
                if items:
                    diffs = [[b[row][it] - b[ref][it] for b in both] for it in items]
                    mean, lo, hi = cluster_bootstrap(diffs)
                    table.setdefault(ref, {})[row] = {"mean": mean, "lo": lo, "hi": hi, "items": len(items),
                                                      "seeds": len(both), "needed": items_needed(diffs)}
        if not table:
            continue
        if not out:
            print(f"\npaired differences, row - reference: the mean over items x seeds [its {LEVEL:.0%} interval, the "
                  f"items resampled with their seeds {RESAMPLES} times] items x seeds ~N, the items an interval "
                  f"would need to exclude 0 if the mean held (items_needed)")
        out[m] = table
        print(f"{m}: {what}")
        print(f"{'row':<12}" + "".join(f"{'- ' + ref:>38}" for ref in table))
        for row in rows:
            cells = [table[ref].get(row) for ref in table]
            if any(cells):
                print(f"{row:<12}" + "".join(f"{cell(c):>38}" if c else f"{'-':>38}" for c in cells))
    return out


if __name__ == "__main__":
    args = sys.argv[1:]
    opts = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
    dirs = [a for a in args if not a.startswith("--")]
    if not dirs or len(dirs) + len(opts) != len(args) or set(opts) - {"against", "items"} \
            or not opts.get("items", "0").isdigit():
        raise SystemExit("usage: python tools/compare.py [--against=ROW,ROW] [--items=N] RUN_DIR [RUN_DIR ...]")
    compare(dirs, opts.get("against", AGAINST), int(opts.get("items", 0)))
