"""
SEAL: Self-Adapting Language Models (Zweiger, Pari et al., 2025, arXiv 2506.10943), the outer loop.

A model writes a *self-edit* for a new input (its own fine-tuning data and directives). An inner loop applies
it with a LoRA fine-tune (lora.py) and the adapted model's score on the downstream task is the reward. The
outer loop is ReST-EM (paper section 3.1): sample self-edits, keep the rewarded ones (E-step), fine-tune the
model on them (M-step, supervised, loss on the self-edit tokens), repeat. It is on-policy filtered behaviour
cloning; there is no value function, no baseline subtraction and no policy gradient.

This file holds what every domain shares: batched sampling, the ReST-EM loop with its run folder (resumable
after kill -9) and the results table. A domain (arc_domain.py) supplies prompts, the inner loop, the reward
and a count of what the self-edits chose.

    python seal.py generate --prompt="The capital of France is"      # first thing to try
    python seal.py run --domain=arc --split=tiny --out=runs/arc-tiny  # what `bash train.sh arc` calls
"""
import dataclasses
import json
import os
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

import model as model_lib

# -----------------------------------------------------------------------------
# Generation: left-padded batches, one prefill shared by n samples, a preallocated KV cache


def sample_next(logits, temperature, top_p, gen):
    """logits (B, V) fp32 -> (B,) token ids. temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:  # nucleus: keep the smallest prefix of sorted tokens whose mass reaches top_p
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p
        sorted_p[drop] = 0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


@torch.no_grad()
def generate_ids(m, tok, prompts, max_new_tokens=128, temperature=0.0, top_p=1.0, n=1, stop=(), seed=0):
    """prompts: token-id lists. Returns len(prompts) * n completions (token-id lists, samples of a prompt
    adjacent), each cut before its stop token or stop string."""
    dev = m.lm_head.weight.device
    B, L = len(prompts), max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0:
        raise ValueError("empty prompt: give at least one token (e.g. BOS)")
    x = torch.full((B, L), tok.pad_id, dtype=torch.long)
    valid = torch.zeros(B, L, dtype=torch.bool)
    for i, p in enumerate(prompts):  # left padding: every row's last prompt token sits at column L-1
        x[i, L - len(p):] = torch.tensor(p)
        valid[i, L - len(p):] = True
    x, valid = x.to(dev), valid.to(dev)
    pos = (valid.long().cumsum(1) - 1).clamp(min=0)
    cache = m.new_cache(B, L + max_new_tokens)
    h = m.hidden(x, input_pos=pos, cache=cache, valid=valid)[:, -1]
    logits = m.lm_head(h).float()
    if n > 1:  # prefill once, then copy the cache into n rows per prompt
        cache, logits, pos = cache.repeat(n), logits.repeat_interleave(n, 0), pos.repeat_interleave(n, 0)
    next_pos = pos[:, -1:] + 1
    gen = torch.Generator(device=dev).manual_seed(seed)
    stop_ids = set(tok.stop_ids)
    out = [[] for _ in range(B * n)]
    done = [False] * (B * n)
    for _ in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_p, gen)
        for i, t in enumerate(nxt.tolist()):  # one device sync per step, not one per row
            if done[i]:
                continue
            done[i] = t in stop_ids
            if not done[i]:
                out[i].append(t)
                done[i] = bool(stop) and any(s in tok.decode(out[i][-8:]) for s in stop)
        if all(done):
            break
        logits = m.lm_head(m.hidden(nxt[:, None], input_pos=next_pos, cache=cache)[:, -1]).float()
        next_pos = next_pos + 1
    return out


@torch.no_grad()
def sample_template(m, tok, prompt, template, n=1, temperature=1.0, seed=0, trace=None):
    """Fill-in sampling for structured answers a small model cannot write freely. template: a list of
    (fixed_text, options): the fixed text is forced, then one option is sampled from the model's own
    probability of each option's tokens, renormalised over the options (at `temperature`; 0 takes the most
    likely). The policy is still the model's, restricted to valid answers, so ReST-EM can sharpen it.
    Returns n token-id lists (the answer after the prompt). trace: a list that receives, per sample and
    field, the options' log-probabilities before renormalising (to inspect the policy)."""
    dev = m.lm_head.weight.device
    enc = lambda s: tok.encode(s) if s else []
    room = len(prompt) + sum(len(enc(f)) + max((len(enc(o)) for o in opts or [""]), default=0)
                             for f, opts in template) + 1
    cache = m.new_cache(1, room)
    h = m.hidden(torch.tensor([prompt], device=dev), cache=cache)[:, -1]
    gen = torch.Generator(device=dev).manual_seed(seed)
    outs = []
    for _ in range(n):
        c, last, ids = cache.repeat(1), h, []
        for fixed, options in template:
            f_ids = enc(fixed)
            if f_ids:
                last = m.hidden(torch.tensor([f_ids], device=dev), cache=c)[:, -1]
                ids += f_ids
            if not options:
                continue
            o_ids = [enc(o) for o in options]
            L = max(map(len, o_ids))
            rows = torch.tensor([o + [tok.pad_id] * (L - len(o)) for o in o_ids], device=dev)
            first = torch.log_softmax(m.lm_head(last).float(), -1)[0]  # the option's first token
            logp = first[rows[:, 0]]
            if L > 1:  # the rest of each option, all options side by side in one batch
                rest = torch.log_softmax(m(rows[:, :-1], cache=c.repeat(len(options))), -1)
                tok_lp = rest.gather(-1, rows[:, 1:, None])[..., 0]
                mask = torch.tensor([[t < len(o) for t in range(1, L)] for o in o_ids], device=dev)
                logp = logp + (tok_lp * mask).sum(-1)
            if trace is not None:
                trace.append(logp.tolist())
            if temperature <= 0:
                j = int(logp.argmax())
            else:
                j = int(torch.multinomial(torch.softmax(logp / temperature, -1), 1, generator=gen))
            last = m.hidden(torch.tensor([o_ids[j]], device=dev), cache=c)[:, -1]
            ids += o_ids[j]
        outs.append(ids)
    return outs


def cut_at_stop(text, stop):
    for s in stop:
        if s in text:
            text = text[:text.index(s)]
    return text


def generate(m, tok, prompts, max_new_tokens=128, temperature=0.0, top_p=1.0, n=1, stop=(), seed=0,
             batch_size=64):
    """Text in, text out. prompts: strings (encoded as they are, no BOS added) or token-id lists."""
    ids = [tok.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    texts = []
    for i in range(0, len(ids), batch_size):
        outs = generate_ids(m, tok, ids[i:i + batch_size], max_new_tokens, temperature, top_p, n, stop, seed + i)
        texts += [cut_at_stop(tok.decode(o), stop) for o in outs]
    return texts


# -----------------------------------------------------------------------------
# Run configuration: dataclass defaults, --key=value overrides (presets live in train.sh)


@dataclass
class RunConfig:
    domain: str = "arc"
    model: str = model_lib.OFFLINE_DEFAULT
    split: str = "tiny"             # data/<domain>/<split>.json
    out: str = "runs/arc-tiny"
    seed: int = 0
    device: str = "auto"            # cuda if available, else cpu
    dtype: str = "auto"             # bf16 on cuda, fp32 on cpu (the dtype policy: lora.py keeps adapters fp32)
    rows: str = "icl,base,seal,oracle"  # which rows of the results table to produce
    # ReST-EM outer loop (paper section 3.1; official ARC values, seal-reference 1.7)
    rounds: int = 1
    rl_samples: int = 15            # self-edits per RL item per round
    eval_samples: int = 5           # self-edits per evaluation item
    se_temperature: float = 0.8
    se_top_p: float = 1.0
    se_max_tokens: int = 128
    sft_rank: int = 16
    sft_alpha: float = 16.0
    sft_lr: float = 5e-5
    sft_epochs: int = 8
    sft_batch: int = 5
    # inner loop and task settings, read by the domain
    fmt: str = "numpy"              # ARC grid text: "numpy" (official) or "compact"
    lora_rank: int = 128
    lora_alpha: float = 16.0
    lora_targets: str = "q_proj,v_proj,gate_proj,up_proj,down_proj"
    warmup: int = 11
    batch_size: int = 2
    max_examples: int = 250
    max_steps: int = 375            # self-edits that would train longer are invalid (reward 0), as in the paper
    max_len: int = 8192
    lr_hint: str = "between 1e-5 and 1e-3"
    oracle: str = '{"data_generation": {"use_basic_augmentations": true, "use_size_augmentations": true, ' \
                  '"use_chain_augmentations": true, "use_repeat_augmentations": true}, "training": ' \
                  '{"strategy": "train_using_output_tokens", "learning_rate": 1e-4, "num_train_epochs": 2}}'
    se_mode: str = "free"           # "free": the model writes the JSON (official); "prefix": its answer starts with
                                    # the skeleton's first key; "schema": keys forced, values sampled among valid ones
    se_lr_options: str = "1e-5,3e-5,1e-4,3e-4,1e-3"  # the learning rates offered in schema mode
    se_epoch_options: str = "1,2,3,4,5"   # the epoch counts offered in schema mode
    eval_batch: int = 32

    # settings that change results: a run folder refuses to resume under different values
    @property
    def fingerprint(self):
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("out", "device")}


def parse_overrides(cfg, argv):
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"expected --key=value, got {arg!r}")
        key, val = arg[2:].split("=", 1)
        if not hasattr(cfg, key):
            raise SystemExit(f"unknown setting --{key} (known: {', '.join(f.name for f in dataclasses.fields(cfg))})")
        typ = type(getattr(cfg, key))
        if typ is bool:
            if val.lower() not in ("true", "false", "1", "0"):
                raise SystemExit(f"--{key} expects true or false, got {val!r}")
            val = val.lower() in ("true", "1")
        else:
            try:
                val = typ(val)
            except ValueError:
                raise SystemExit(f"--{key} expects {typ.__name__}, got {val!r}") from None
        setattr(cfg, key, val)
    return cfg


# -----------------------------------------------------------------------------
# The run folder: everything needed to resume after kill -9 and to read or plot the results.
#   config.json          settings that change results (a resume under other values is refused)
#   samples-<phase>.json sampled self-edits of a phase, written once, atomically, before any is evaluated
#   evals.jsonl          one line per finished (phase, item, k) evaluation, appended and fsynced
#   policy-round<r>/     the policy after ReST-EM round r (hub-style folder, loadable by transformers)
#   results.json         the table: solved / total per row, beside the paper's numbers


def write_atomic(path: Path, text: str):
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunFolder:
    def __init__(self, cfg: RunConfig, items: dict | None = None):
        """items: the run's task ids by role. They join the fingerprint: a split file can change under its name."""
        self.dir = Path(cfg.out)
        self.dir.mkdir(parents=True, exist_ok=True)
        cfg_file = self.dir / "config.json"
        fingerprint = {**cfg.fingerprint, **({"items": items} if items else {})}
        if cfg_file.exists():
            old = json.loads(cfg_file.read_text())
            diff = {k: (old.get(k), v) for k, v in fingerprint.items() if old.get(k) != v}
            if diff:
                raise SystemExit(f"{self.dir} holds a run with other settings {diff}; use another --out")
        else:
            write_atomic(cfg_file, json.dumps(fingerprint, indent=2))
        self.evals_file = self.dir / "evals.jsonl"
        self.done = {}
        if self.evals_file.exists():
            lines = self.evals_file.read_text().splitlines()
            for line in lines:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill: drop it, it is evaluated again
                    continue
                self.done[(rec["phase"], rec["item"], rec["k"])] = rec
            write_atomic(self.evals_file, "".join(json.dumps(r) + "\n" for r in self.done.values()))

    def log(self, rec: dict):
        with open(self.evals_file, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[(rec["phase"], rec["item"], rec["k"])] = rec

    def samples(self, phase, make):
        """The sampled self-edits of a phase: made once, then read back on every resume."""
        path = self.dir / f"samples-{phase}.json"
        if path.exists():
            return json.loads(path.read_text())
        s = make()
        write_atomic(path, json.dumps(s))
        return s


def stable_seed(*parts) -> int:
    """A seed from names, independent of Python's hash randomisation and of evaluation order."""
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


def fmt_time(s):
    return f"{s / 3600:.1f}h" if s > 5400 else f"{s / 60:.1f}m" if s > 90 else f"{s:.0f}s"


# -----------------------------------------------------------------------------
# ReST-EM


def sample_self_edits(m, tok, domain, items, n, cfg, phase):
    """E-step sampling: n self-edits per item at the policy's temperature (one prefill per item)."""
    prompts = [domain.prompt_ids(it) for it in items]
    t0 = time.time()
    outs = []
    if domain.template is not None:
        for i, p in enumerate(prompts):
            outs += sample_template(m, tok, p, domain.template, n, cfg.se_temperature,
                                    seed=stable_seed(cfg.seed, phase, items[i]))
    else:
        step = max(1, cfg.eval_batch // n)
        for i in range(0, len(prompts), step):
            outs += generate_ids(m, tok, prompts[i:i + step], cfg.se_max_tokens, cfg.se_temperature,
                                 cfg.se_top_p, n, seed=stable_seed(cfg.seed, phase, i))
    dt = time.time() - t0
    ntok = sum(map(len, outs))
    print(f"[{phase}] sampled {len(outs)} self-edits in {fmt_time(dt)} ({ntok / dt:.0f} tok/s)", flush=True)
    return [{"item": it, "k": k, "prompt_ids": prompts[j], "ids": outs[j * n + k],
             "text": domain.answer_prefix + tok.decode(outs[j * n + k])}
            for j, it in enumerate(items) for k in range(n)]


def evaluate_phase(run, m, domain, phase, jobs, cfg):
    """Run the inner loop + reward for every (item, k, self-edit) not already in the run folder."""
    todo = [j for j in jobs if (phase, j["item"], j["k"]) not in run.done]
    if todo:
        print(f"[{phase}] {len(jobs) - len(todo)}/{len(jobs)} already done; evaluating {len(todo)}", flush=True)
    t0 = time.time()
    for i, j in enumerate(todo):
        t1 = time.time()
        res = domain.evaluate(m, j["item"], j["text"], seed=stable_seed(cfg.seed, phase, j["item"], j["k"]))
        rec = {"phase": phase, "item": j["item"], "k": j["k"], "text": j["text"], **res,
               "seconds": round(time.time() - t1, 2)}
        if "ids" in j:
            rec["prompt_ids"], rec["ids"] = j["prompt_ids"], j["ids"]
        run.log(rec)
        eta = (time.time() - t0) / (i + 1) * (len(todo) - i - 1)
        why = "" if rec.get("valid", True) else f" ({rec.get('reason')})"
        print(f"[{phase}] {i + 1}/{len(todo)} {j['item']} #{j['k']}: reward {rec['reward']:.3g}{why} "
              f"{rec['seconds']:.0f}s, ETA {fmt_time(eta)}", flush=True)
    return [run.done[(phase, j["item"], j["k"])] for j in jobs]


def m_step(m, records, cfg, phase, eot_id):
    """ReST-EM M-step: supervised LoRA fine-tune on the kept (prompt, self-edit) pairs, merged into the
    weights (official ARC: r16 alpha16, lr 5e-5, 8 epochs, batch 5, cosine, loss on the self-edit only)."""
    import lora
    examples = [(r["prompt_ids"], r["ids"] + [eot_id]) for r in records]
    adapter = lora.inject(m, r=cfg.sft_rank, alpha=cfg.sft_alpha, targets=cfg.lora_targets.split(","),
                          seed=stable_seed(cfg.seed, phase))
    res = lora.train(m, examples, lr=cfg.sft_lr, epochs=cfg.sft_epochs, batch_size=cfg.sft_batch,
                     loss_on="completion", schedule="cosine", warmup=0, seed=stable_seed(cfg.seed, phase),
                     adapter=adapter, max_len=cfg.max_len)
    adapter.merge()
    first, last = (res.losses[0], res.losses[-1]) if res.losses else (float("nan"), float("nan"))
    print(f"[{phase}] M-step on {len(examples)} self-edits: {res.steps} steps, loss {first:.3f} -> {last:.3f}, "
          f"{fmt_time(res.seconds)}", flush=True)
    return res


def run(cfg: RunConfig):
    import arc_domain
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    dtype = {"auto": torch.bfloat16 if device == "cuda" else torch.float32, "fp32": torch.float32,
             "bf16": torch.bfloat16}[cfg.dtype]
    torch.manual_seed(cfg.seed)
    m, tok = model_lib.load(cfg.model, device=device, dtype=dtype)
    domain = {"arc": arc_domain.ArcDomain}[cfg.domain](cfg, tok)
    run_dir = RunFolder(cfg, items={"rl": domain.rl_items, "eval": domain.eval_items})
    print(f"run folder {run_dir.dir}; model {cfg.model} on {device} ({dtype}); domain {cfg.domain}/{cfg.split}",
          flush=True)
    rows = cfg.rows.split(",")
    phases = {}  # row name -> evaluation records

    def fixed(row, edit):
        jobs = [{"item": it, "k": 0, "text": edit} for it in domain.eval_items]
        phases[row] = evaluate_phase(run_dir, m, domain, row, jobs, cfg)

    def sampled(row, items, n):
        jobs = run_dir.samples(row, lambda: sample_self_edits(m, tok, domain, items, n, cfg, row))
        recs = evaluate_phase(run_dir, m, domain, row, jobs, cfg)
        valid = sum(r.get("valid", True) for r in recs)
        print(f"[{row}] valid self-edits {valid}/{len(recs)}, mean reward "
              f"{sum(r['reward'] for r in recs) / max(1, len(recs)):.3f}", flush=True)
        return recs

    if "icl" in rows:
        fixed("icl", None)
    if "oracle" in rows:
        fixed("oracle", cfg.oracle)
    if "base" in rows:
        phases["base"] = sampled("base", domain.eval_items, cfg.eval_samples)
    if "seal" in rows:
        for r in range(1, cfg.rounds + 1):
            policy_dir = run_dir.dir / f"policy-round{r}"
            if (policy_dir / "DONE").exists():  # resume: this round's M-step is done
                if (policy_dir / "DONE").read_text().strip() == "ok":  # else "unchanged": nothing was kept
                    domain.release(m)
                    del m
                    m, _ = model_lib.load(str(policy_dir), device=device, dtype=dtype)
                    print(f"[rl{r}] policy loaded from {policy_dir}", flush=True)
                continue
            recs = sampled(f"rl{r}", domain.rl_items, cfg.rl_samples)
            kept = domain.select(recs)  # E-step filter: ARC keeps every self-edit with reward 1
            print(f"[rl{r}] keeping {len(kept)}/{len(recs)} self-edits for the M-step", flush=True)
            policy_dir.mkdir(exist_ok=True)
            if kept:
                domain.release(m)  # drop the inner-loop adapter before changing the weights
                res = m_step(m, kept, cfg, f"rl{r}", domain.eot_id)
                model_lib.save(m, policy_dir, tokenizer_dir=model_lib.resolve(cfg.model))
                write_atomic(policy_dir / "m_step.json", json.dumps(
                    {"examples": len(kept), "steps": res.steps, "losses": res.losses, "seconds": res.seconds}))
            (policy_dir / "DONE").write_text("ok\n" if kept else "unchanged\n")
        phases["seal"] = sampled("seal", domain.eval_items, cfg.eval_samples)
    return report(run_dir, cfg, domain, phases)


def round_summaries(run_dir, domain, rounds):
    """Per ReST-EM round: how many sampled self-edits were valid and rewarded, and what the M-step did."""
    out = []
    for r in range(1, rounds + 1):
        recs = [v for (phase, _, _), v in run_dir.done.items() if phase == f"rl{r}"]
        if not recs:
            break
        ms = run_dir.dir / f"policy-round{r}" / "m_step.json"  # absent when the round kept nothing
        out.append({"round": r, "samples": len(recs), "valid": sum(x.get("valid", True) for x in recs),
                    "rewarded": sum(x["reward"] for x in recs), "choices": domain.choices(recs),
                    "m_step": json.loads(ms.read_text()) if ms.exists() else None})
    return out


def report(run_dir, cfg, domain, phases):
    rows = []
    for key, label, paper in domain.rows:
        if key not in phases:
            continue
        recs = phases[key]
        solved = sum(r["reward"] for r in recs)
        rows.append({"row": key, "method": label, "solved": solved, "total": len(recs),
                     "rate": solved / max(1, len(recs)), "paper": paper,
                     "valid": sum(r.get("valid", True) for r in recs), "choices": domain.choices(recs)})
    rounds = round_summaries(run_dir, domain, cfg.rounds) if "seal" in phases else []
    result = {"domain": cfg.domain, "split": cfg.split, "model": cfg.model, "seed": cfg.seed,
              "date": time.strftime("%Y-%m-%d"), "rows": rows, "rounds": rounds}
    write_atomic(run_dir.dir / "results.json", json.dumps(result, indent=2))
    print(f"\n{'method':<36}{'ours':>16}{'paper':>10}")
    for r in rows:
        print(f"{r['method']:<36}{r['rate'] * 100:>8.1f}% ({r['solved']:g}/{r['total']}){r['paper']:>10}")
    for r in rows:
        if any(r["choices"].values()):
            print(f"{r['row']:>6} chose " + "; ".join(
                f"{k} " + ", ".join(f"{v} x{n}" for v, n in sorted(c.items())) for k, c in r["choices"].items()))
    for r in rounds:
        ms = r["m_step"]
        what = (f"M-step on {ms['examples']}: {ms['steps']} steps, loss {ms['losses'][0]:.3g} -> "
                f"{ms['losses'][-1]:.3g}" if ms and ms["losses"] else "no M-step, the policy is unchanged")
        print(f"ReST-EM round {r['round']}: {r['valid']}/{r['samples']} valid self-edits, "
              f"{r['rewarded']:g} rewarded; {what}")
    print(f"\nresults: {run_dir.dir / 'results.json'}; every self-edit: {run_dir.evals_file}")
    return result


# -----------------------------------------------------------------------------
# CLI


def cli_generate(argv):
    opts = {"model": model_lib.OFFLINE_DEFAULT, "prompt": "The capital of France is", "max_new_tokens": "32",
            "temperature": "0", "chat": "false", "device": "cpu"}
    for a in argv:
        k, _, v = a.lstrip("-").partition("=")
        if k not in opts:
            raise SystemExit(f"unknown option --{k} (known: {', '.join(opts)})")
        opts[k] = v
    m, tok = model_lib.load(opts["model"], device=opts["device"])
    prompt = opts["prompt"]
    if opts["chat"] == "true":
        prompt = tok.chat([{"role": "user", "content": prompt}])
    t0 = time.time()
    ids = generate_ids(m, tok, [tok.encode(prompt)], int(opts["max_new_tokens"]), float(opts["temperature"]))[0]
    dt = time.time() - t0
    print(opts["prompt"] + tok.decode(ids))
    print(f"--- {len(ids)} tokens in {dt:.2f}s ({len(ids) / dt:.1f} tok/s, prefill included)", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("generate", "run"):
        raise SystemExit(__doc__)
    if sys.argv[1] == "generate":
        cli_generate(sys.argv[2:])
    else:
        run(parse_overrides(RunConfig(), sys.argv[2:]))
