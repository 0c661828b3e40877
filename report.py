"""
A SEAL run's results: the table (one line per row, beside the paper's number), what each ReST-EM round sampled,
kept and fine-tuned, written to the run folder's results.json and printed. seal.run calls report() once every step
is done; tools/compare.py reads several runs' results.json side by side.
"""
import time


def round_summaries(folder, domain, rounds):
    """Per ReST-EM round: how many sampled self-edits were valid and rewarded, what they and the kept ones chose
    (the E-step's view of the policy, before its M-step), their metrics, and what the M-step did."""
    out = []
    for r in range(1, rounds + 1):
        recs = [v for (phase, _, _), v in folder.done.items() if phase == f"rl{r}"]
        if not recs:
            break
        kept = domain.select(recs)
        out.append({"round": r, "samples": len(recs), "valid": sum(x["valid"] for x in recs),
                    "rewarded": sum(x["reward"] for x in recs), "choices": domain.choices(recs),
                    "metrics": domain.metrics(recs), "kept_choices": domain.choices(kept), "kept_metrics":
                    domain.metrics(kept), "m_step": folder.m_step_record(r)})
    return out


def report(folder, cfg, domain, rows, records, with_rounds=True):
    """The results table ({Row: records} summed per row), the rounds' summaries (with_rounds: a row came from the
    ReST-EM policy), written to the run folder and printed beside the paper's numbers."""
    table = []
    for row in rows:
        recs = records[row]
        total = sum(r["weight"] for r in recs)  # a pooled record stands for all its items' questions
        score = sum(r["score"] * r["weight"] for r in recs)
        table.append({"row": row.key, "method": row.label, "score": score, "total": total,
                      "rate": score / max(1, total), "paper": row.paper,
                      "valid": sum(r["valid"] for r in recs), "choices": domain.choices(recs),
                      "metrics": domain.metrics(recs)})
    rounds = round_summaries(folder, domain, cfg.rounds) if with_rounds else []
    result = {"domain": type(domain).__name__, "model": cfg.model, "seed": cfg.seed, "date": time.strftime("%Y-%m-%d"),
              "config": cfg.fingerprint, "rows": table, "rounds": rounds}
    if not folder.ranks.main:
        return result
    folder.write_results(result)
    print(f"\n{'method':<44}{'ours':<20}paper")
    for r in table:
        ours = f"{r['rate'] * 100:.1f}% ({r['score']:.3g}/{r['total']:g})"
        print(f"{r['method']:<44}{ours:<20}{r['paper']}")
    for r in table:
        if r["metrics"]:
            print(f"{r['row']:>10}: " + ", ".join(f"{k} {v:.3f}" for k, v in r["metrics"].items()))
    chose = lambda choices: "; ".join(f"{k} " + ", ".join(f"{v} x{n}" for v, n in sorted(c.items()))
                                      for k, c in choices.items())
    for r in table:
        if any(r["choices"].values()):
            print(f"{r['row']:>10} chose {chose(r['choices'])}")
    for r in rounds:
        for key, what in (("choices", "sampled"), ("kept_choices", "kept")):
            if any(r[key].values()):
                print(f"  rl{r['round']} {what:>7} {chose(r[key])}")
        for key, what in (("metrics", "sampled"), ("kept_metrics", "kept")):
            if r[key]:
                print(f"  rl{r['round']} {what:>7}: " + ", ".join(f"{k} {v:.3f}" for k, v in r[key].items()))
    for r in rounds:
        ms = r["m_step"]
        what = (f"M-step on {ms['examples']}: {ms['steps']} steps, loss {ms['losses'][0]:.3g} -> "
                f"{ms['losses'][-1]:.3g}" if ms and ms["losses"] else "no M-step, the policy is unchanged")
        print(f"ReST-EM round {r['round']}: {r['valid']}/{r['samples']} valid self-edits, "
              f"reward ({domain.reward_name}) sum {r['rewarded']:.3g}; {what}")
    print(f"\nresults: {folder.results_file}; every self-edit: {folder.evals_file}")
    return result
