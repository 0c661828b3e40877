"""
Several runs of one experiment (seeds) side by side: each row's headline rate per seed with the mean and the sample
sd over seeds, then every extra metric the rows carry (knowledge's sampled accuracy, answer coverage, ...) as mean
+- sd. It reads only the run folders' results.json.

    python compare.py runs/kp-s0 runs/kp-s1 runs/kp-s2
"""
import json
import sys
from pathlib import Path


def compare(dirs):
    """The headline rate of every row, per seed, with the mean and the sample sd over seeds; then each extra metric
    the rows carry (a domain's `metrics`, e.g. knowledge's sampled accuracy) as mean +- sd over seeds."""
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
    return out


def mean_sd(xs):
    """The mean and the sample standard deviation (0 for a single value)."""
    mean = sum(xs) / len(xs)
    return mean, (sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit("usage: python compare.py RUN_DIR [RUN_DIR ...]")
    compare(sys.argv[1:])
