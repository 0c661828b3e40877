"""
Studies around the knowledge domain (domains/knowledge.py): what the paper's table rests on, measured at this
model's scale (docs/knowledge.md).

    python -m domains.knowledge_studies filter --configs=all:32:1e-3:10 --texts=passage,sentences,gold_qa
                                                       # which inner loop (and --frame) lets a self-edit matter
    python -m domains.knowledge_studies prompts        # what each prompt and temperature gives RL to choose from
    python -m domains.knowledge_studies reliability    # can the reward tell self-edits apart (two seeds each)
    python -m domains.knowledge_studies forget         # catastrophic forgetting: edits merged one after another
    python -m domains.knowledge_studies squad --squad=dev-v1.1.json   # the paper's passage selection from SQuAD

`bash train.sh knowledge SUB` runs them with the knowledge preset; `SUB --help` lists a study's settings.
"""
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import seal
import settings
from run_folder import RunFolder, fmt_time, write_atomic
from domains.knowledge import ALL_PROJ, Knowledge, KnowledgeConfig
from domains.knowledge_text import (CONTROLS, GRADERS, answer_coverage, answer_lines, distinct_ngrams,
                                    self_edit_lines, shared_ngrams, squad_selection)

# -----------------------------------------------------------------------------
# filter: which inner loop puts a passage into this model's weights (the paper's r32 on q, v teaches a 135M
# model nothing; see docs/knowledge.md). forget: catastrophic forgetting. squad: the paper's passage selection.


@dataclass
class FilterConfig(KnowledgeConfig):
    configs: str = "qv:32:1e-3:10"  # targets:rank:lr:epochs[:batch], targets qv (q_proj, v_proj) or all (7
                                    # projections), batch the sequences per step (default --inner_batch)
    texts: str = "passage"          # what each config trains, beside the passage: passage (nothing else), and
                                    # the controls sentences, gold_qa (CONTROLS)
    n_filter: int = 4               # passages to try each config on
    filter_on: str = "rl"           # rl | eval: choose settings on RL passages, never on the evaluation ones
    filter_seeds: int = 1           # inner-loop seeds per (config, text, passage)


def parse_inner(spec, cfg):
    """A config spec targets:rank:lr:epochs[:batch] as KnowledgeConfig overrides."""
    try:
        targets, rank, lr, epochs, *batch = spec.split(":")
        return {"inner_targets": {"qv": "q_proj,v_proj", "all": ALL_PROJ}[targets], "inner_rank": int(rank),
                "inner_alpha": 2.0 * int(rank), "inner_lr": float(lr), "inner_epochs": int(epochs),
                "inner_batch": int(batch[0]) if batch else cfg.inner_batch, "eval_times": 1}
    except (ValueError, KeyError, IndexError):
        raise SystemExit(f"--configs: {spec!r} is not targets:rank:lr:epochs[:batch] (targets qv or all)") from None


def filter_configs(argv):
    """Which inner loop (and --frame) lets a self-edit's text matter: per config, the accuracy and gold-answer
    log-likelihood after training on the passage alone and on the passage beside each control text (the passage's
    own sentences; its gold Q/A, an upper bound). Written to --out/filter.json."""
    cfg = settings.parse_overrides(FilterConfig(), argv)
    settings.check_choice("filter_on", cfg.filter_on, ("rl", "eval"))
    texts = cfg.texts.split(",")
    for t in texts:
        settings.check_choice("texts", t, ("passage", *CONTROLS))
    learner = seal.Learner(cfg, cfg.model)
    dom = Knowledge(cfg, learner.tok)
    items = (dom.rl_items if cfg.filter_on == "rl" else dom.eval_items)[:cfg.n_filter]
    text_of = lambda t, it: "" if t == "passage" else CONTROLS[t](dom.passages[it])
    base = [learner.evaluate(dom, it, None, 0) for it in items]
    show = lambda recs: (f"{cfg.grader} {sum(r['score'] for r in recs) / len(recs):.3f}, "
                         f"loglik {sum(r['loglik'] for r in recs) / len(recs):.2f}")
    print(f"{len(items)} {cfg.filter_on} passages, frame {cfg.frame}; no adaptation: {show(base)}", flush=True)
    out = {"items": items, "frame": cfg.frame, "grader": cfg.grader, "base": base, "configs": {}}
    for spec in cfg.configs.split(","):
        c = FilterConfig(**{**vars(cfg), **parse_inner(spec, cfg)})
        learner.cfg, dom.cfg = c, c
        learner.adapter.remove()
        learner.inject()
        for t in texts:
            t0 = time.time()
            recs = [learner.evaluate(dom, it, text_of(t, it), seal.stable_seed(cfg.seed, "filter", it, s))
                    for it in items for s in range(cfg.filter_seeds)]
            loss = sum(r["runs"][0]["loss_last"] or 0 for r in recs) / len(recs)
            print(f"{spec} {t:>9}: {show(recs)}; final loss {loss:.3f}; {(time.time() - t0) / len(recs):.0f}s "
                  f"per run", flush=True)
            out["configs"].setdefault(spec, {})[t] = recs
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        write_atomic(Path(cfg.out) / "filter.json", json.dumps(out, indent=1))
    return out


@dataclass
class PromptsConfig(KnowledgeConfig):
    prompts: str = "implications,rewrite,self-qa"   # the prompt variants to compare (knowledge_text.PROMPTS)
    temperatures: str = "1.0,0.7"                  # the sampling temperatures to compare
    n_passages: int = 6                           # RL passages (the first n of rl_data)


def compare_prompts(argv):
    """What each prompt and temperature gives RL to choose from, at no training cost: --rl_samples self-edits per RL
    passage, their answer coverage (mean, and the best sample's) and lines. ReST-EM keeps the best of k, so a
    prompt whose best samples state the facts asked about is what it can clone (docs/knowledge.md)."""
    cfg = settings.parse_overrides(PromptsConfig(), argv)
    learner = seal.Learner(cfg, cfg.model)
    print(f"{cfg.n_passages} RL passages x {cfg.rl_samples} self-edits; coverage: the share of gold answers stated")
    out = {}
    for variant in cfg.prompts.split(","):
        for t in map(float, cfg.temperatures.split(",")):
            c = PromptsConfig(**{**vars(cfg), "prompt": variant})
            dom = Knowledge(c, learner.tok)
            items = dom.rl_items[:cfg.n_passages]
            jobs = seal.sample_self_edits(learner.policy(), learner.tok, dom, items, cfg.rl_samples, c,
                                          f"prompts-{variant}", temperature=t)
            cov = [answer_coverage(dom.passages[j["item"]], j["text"]) for j in jobs]
            best = [max(cov[i:i + cfg.rl_samples]) for i in range(0, len(cov), cfg.rl_samples)]
            lines = sum(len(self_edit_lines(j["text"], variant)) for j in jobs) / len(jobs)
            stating = sum(answer_lines(dom.passages[j["item"]], j["text"], variant) for j in jobs) / len(jobs)
            texts = [j["text"] for j in jobs]
            row = out[f"{variant}@{t:g}"] = {
                "coverage": sum(cov) / len(cov), "best_of_k": sum(best) / len(best), "lines": lines,
                "stating_lines": stating, "distinct_2": distinct_ngrams(texts),
                "shared_2": shared_ngrams([(j["item"], j["text"]) for j in jobs]), "texts": texts}
            print(f"{variant:>18} T={t:<4g} coverage {row['coverage']:.2f}, best of {cfg.rl_samples} "
                  f"{row['best_of_k']:.2f}, {lines:.1f} lines ({stating:.1f} stating an answer), distinct_2 "
                  f"{row['distinct_2'] or 0:.2f}, shared_2 {row['shared_2'] or 0:.2f}", flush=True)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    write_atomic(Path(cfg.out) / "prompts.json", json.dumps(out, indent=1))
    return out


@dataclass
class ReliabilityConfig(KnowledgeConfig):
    n_passages: int = 8             # RL passages (the first n of rl_data); k = --rl_samples self-edits each
    retest_seeds: int = 2           # inner-loop runs of every self-edit, each its own seed


def _pearson(x, y):
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    den = (x.square().sum() * y.square().sum()).sqrt()
    return (x * y).sum().item() / den.item() if den > 0 else float("nan")


def reliability_stats(v):
    """v: (passages, k self-edits, seeds) rewards of one kind. What ReST-EM's best-of-k needs from a reward:
    retest_r, the correlation of two seeds' rewards over the self-edits, and within_r, the same after removing
    each passage's mean (best-of-k compares self-edits of one passage only); ties, the share of passages whose k
    samples all score alike under the first seed; sample_sd, the spread between a passage's samples (their
    seed-mean), against seed_sd, the spread between seeds of the same sample; agree, the share of passages whose
    best sample is the same under the first two seeds."""
    v = torch.as_tensor(v, dtype=torch.float64)
    n, k, s = v.shape
    a, b = v[..., 0], v[..., 1]
    centred = lambda x: x - x.mean(1, keepdim=True)
    return {"retest_r": _pearson(a.flatten(), b.flatten()),
            "within_r": _pearson(centred(a).flatten(), centred(b).flatten()),
            "ties": (a.max(1).values == a.min(1).values).double().mean().item(),
            "sample_sd": v.mean(2).std(1).mean().item(),
            "seed_sd": v.std(2).square().mean().sqrt().item(),
            "agree": (a.argmax(1) == b.argmax(1)).double().mean().item()}


def reliability(argv):
    """Can the reward tell self-edits apart? Every one of k base-policy self-edits of n RL passages is evaluated
    under --retest_seeds inner-loop seeds; per candidate reward, reliability_stats. If the spread between samples is
    not clearly above the seed noise, best-of-k keeps noise and ReST-EM clones it (docs/knowledge.md). Resumable:
    --out holds the samples and one line per evaluation."""
    cfg = settings.parse_overrides(ReliabilityConfig(), argv)
    if cfg.retest_seeds < 2:
        raise SystemExit("--retest_seeds must be at least 2 (a retest needs two runs)")
    cfg.eval_times = 1
    cfg.answer_samples = cfg.answer_samples or 8  # the sampled-accuracy reward is one of the candidates
    learner = seal.Learner(cfg, cfg.model)
    dom = Knowledge(cfg, learner.tok)
    items = dom.rl_items[:cfg.n_passages]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    folder = RunFolder(cfg, items={"reliability": items})
    jobs = folder.samples("reliability", lambda: seal.sample_self_edits(learner.policy(), learner.tok, dom, items,
                                                                           cfg.rl_samples, cfg, "reliability"))
    t0, todo = time.time(), [(j, s) for j in jobs for s in range(cfg.retest_seeds)
                            if (f"seed{s}", j["item"], j["k"]) not in folder.done]
    for i, (j, s) in enumerate(todo):
        seed = seal.stable_seed(cfg.seed, "reliability", j["item"], j["k"], s)
        res = learner.evaluate(dom, j["item"], j["text"], seed)
        folder.log({"phase": f"seed{s}", "item": j["item"], "k": j["k"], "text": j["text"], **res})
        eta = (time.time() - t0) / (i + 1) * (len(todo) - i - 1)
        print(f"{i + 1}/{len(todo)} {j['item']} #{j['k']} seed {s}: {cfg.grader} {res['score']:.2f}, sampled "
              f"{res['sampled']:.2f}, loglik {res['loglik']:.2f}, ETA {fmt_time(eta)}", flush=True)
    k, seeds = cfg.rl_samples, range(cfg.retest_seeds)
    rec = lambda it, kk, s: folder.done[(f"seed{s}", it, kk)]
    rewards = {**{g: lambda r, g=g: r["accuracy"][g] for g in GRADERS}, "loglik": lambda r: r["loglik"],
               "sampled": lambda r: r["sampled"]}
    table = {name: reliability_stats([[[fn(rec(it, kk, s)) for s in seeds] for kk in range(k)] for it in items])
             for name, fn in rewards.items()}
    n = len(items) * k * len(seeds)
    means = {name: sum(fn(rec(it, kk, s)) for it in items for kk in range(k) for s in seeds) / n
             for name, fn in rewards.items()}
    print(f"\n{len(items)} RL passages x {k} self-edits x {len(seeds)} seeds, prompt {cfg.prompt}, frame {cfg.frame}")
    print(f"{'reward':<10}{'mean':>8}{'retest r':>10}{'within r':>10}{'ties':>7}{'sample sd':>11}{'seed sd':>9}"
          f"{'agree':>7}")
    for name, st in table.items():
        print(f"{name:<10}{means[name]:>8.3f}{st['retest_r']:>10.2f}{st['within_r']:>10.2f}{st['ties']:>7.2f}"
              f"{st['sample_sd']:>11.3f}{st['seed_sd']:>9.3f}{st['agree']:>7.2f}")
    result = {"items": items, "k": k, "seeds": len(seeds), "prompt": cfg.prompt, "frame": cfg.frame,
              "means": means, "stats": table}
    write_atomic(out / "reliability.json", json.dumps(result, indent=1))
    return result


def forget(argv):
    """Catastrophic forgetting (paper section 5): passages edited in sequence, each self-edit's adapter merged into
    the weights in turn; after every step, the accuracy on every passage of the sequence. Row 0 is the base model."""
    cfg = settings.parse_overrides(KnowledgeConfig(), argv)
    learner = seal.Learner(cfg, cfg.model)
    dom = Knowledge(cfg, learner.tok)
    items = dom.eval_items[:cfg.n_forget]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    acc = lambda it: dom.evaluate(learner.m, learner.adapter, it, None, 0)["score"]
    matrix = [[acc(it) for it in items]]
    texts = []
    for step, it in enumerate(items, 1):
        job = seal.sample_self_edits(learner.policy(), learner.tok, dom, [it], 1, cfg, f"forget{step}")[0]
        texts.append(job["text"])
        learner.adapter.reset(seed=seal.stable_seed(cfg.seed, "forget", step))
        dom.train(learner.m, learner.adapter, dom.sequences(dom.passages[it], job["text"]), seed=step)
        learner.merge_adapter()
        matrix.append([acc(j) for j in items])
        print(f"after edit {step} ({it}): " + " ".join(f"{a:.2f}" for a in matrix[-1]), flush=True)
    result = {"items": items, "titles": [dom.passages[i]["title"] for i in items], "grader": cfg.grader,
              "matrix": matrix, "self_edits": texts, "model": cfg.model, "seed": cfg.seed}
    write_atomic(out / "forgetting.json", json.dumps(result, indent=2))
    print(f"forgetting matrix (row i: after i merged edits; column j: passage j): {out / 'forgetting.json'}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return result
    fig, ax = plt.subplots(figsize=(5, 4.5))
    im = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    ax.set_xlabel("passage")
    ax.set_ylabel("edits merged")
    ax.set_title("accuracy after sequential self-edits")
    fig.colorbar(im)
    fig.savefig(out / "forgetting.png", dpi=120, bbox_inches="tight")
    return result


@dataclass
class SquadConfig:
    squad: str = ""                 # SQuAD v1.1 dev-v1.1.json (or train)
    seed: int = 42
    start: int = 0
    n: int = 200
    out: str = "data/knowledge/squad-eval.json"


def squad(argv):
    cfg = settings.parse_overrides(SquadConfig(), argv)
    if not cfg.squad:
        raise SystemExit("squad: give --squad=PATH/dev-v1.1.json")
    sel = squad_selection(cfg.squad, cfg.seed, cfg.start, cfg.n)
    Path(cfg.out).write_text(json.dumps(sel, indent=1) + "\n")
    print(f"{len(sel)} passages, {sum(len(p['questions']) for p in sel)} questions -> {cfg.out}")


def main(argv):
    settings.dispatch(argv, {"filter": filter_configs, "prompts": compare_prompts, "reliability": reliability,
                             "forget": forget, "squad": squad}, __doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
