"""
SEAL: Self-Adapting Language Models (Zweiger, Pari et al., 2025, arXiv 2506.10943), the outer loop.

A model writes a *self-edit* for a new input (its own fine-tuning data and directives). An inner loop applies
it with a LoRA fine-tune (lora.py) and the adapted model's score on the downstream task is the reward. The
outer loop is ReST-EM (paper section 3.1): sample self-edits, keep the rewarded ones (E-step), fine-tune the
model on them (M-step, supervised, loss on the self-edit tokens), repeat. It is on-policy filtered behaviour
cloning; there is no value function, no baseline subtraction and no policy gradient.

This file holds what every domain shares and names none: the settings, the domain contract (Domain, Row), the
model's one owner (Learner) and the ReST-EM loop. Sampling lives in sampling.py, the run folder (resumable after
kill -9) and torchrun's processes in run_folder.py, the results table in report.py, several runs' tables side by
side in tools/compare.py. A domain (domains/arc.py, domains/knowledge.py) subclasses Domain and calls run().

    python -m domains.arc run --split=tiny --out=runs/arc-tiny     # what `bash train.sh arc` calls
    python -m domains.knowledge run                                # what `bash train.sh knowledge` calls
"""
import dataclasses
import math
import time
import zlib
from dataclasses import dataclass

import torch

import checkpoint
import lora
import settings
from report import report
from run_folder import NEW_POLICY, PENDING, Progress, Ranks, RunFolder, fmt_time, hold_lock
from sampling import generate_ids, sample_template

# -----------------------------------------------------------------------------
# Settings: dataclass defaults (a domain's subclass holds its paper values), --key=value overrides parsed by
# settings.py (so are --help's lines: the fields' comments). Presets live in train.sh.


RECORDS = 2  # the evaluation records' format, part of the fingerprint: 2 since a record's "reward" is what the
            # E-step ranks and its "score" what the table counts (before, "reward" was the table's number)


@dataclass
class RunConfig:
    """Settings every domain has. A domain subclasses it, adds its own fields and sets the paper's defaults."""
    model: str = checkpoint.OFFLINE_DEFAULT  # a hub id, a local folder, or smollm2-135m (the offline model)
    out: str = "runs/seal"          # the run folder; the same command resumes a killed run from it
    seed: int = 0                   # every sampling, inner loop and M-step is seeded from it and names
    device: str = "auto"            # cuda if available, else cpu
    dtype: str = "auto"             # bf16 on cuda, fp32 on cpu (lora.py keeps adapters and optimizer state fp32)
    compile: bool = False           # torch.compile the decoding step and the training forward (for a GPU; on a
                                    # CPU the compiled decoding step ran 2x slower than eager: docs/speed.md)
    rows: str = ""                  # which rows of the results table to produce, by key; "" for all
    teacher: str = ""               # a model whose self-edits fill the `teacher` row (the paper's GPT-4.1 row)
    # ReST-EM outer loop (paper section 3.1)
    rounds: int = 1                 # ReST-EM rounds: sample, reward, keep, fine-tune
    rl_samples: int = 5             # self-edits per RL item per round
    eval_samples: int = 1           # self-edits per evaluation item
    se_temperature: float = 1.0     # sampling temperature of self-edits
    rl_temperature: float = 0.0     # the E-step's own temperature on RL items (0: --se_temperature). ReST-EM can
                                    # only keep what it samples: a hotter E-step explores further than evaluation
    se_top_p: float = 1.0           # nucleus sampling of self-edits (1: off)
    se_max_tokens: int = 128        # the longest self-edit, in tokens
    # the inner loop's adapter: injected once, reset before every self-edit
    inner_rank: int = 32            # the inner loop's LoRA rank
    inner_alpha: float = 64.0       # the inner loop's LoRA alpha (scale alpha / rank)
    inner_targets: str = "q_proj,v_proj"  # the projections the inner loop's LoRA wraps
    # the M-step: a fresh LoRA on the kept (prompt, self-edit) pairs, merged into the weights
    sft_rank: int = 16              # the M-step's LoRA rank
    sft_alpha: float = 16.0         # the M-step's LoRA alpha
    sft_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # the M-step's LoRA targets
    sft_lr: float = 5e-5            # the M-step's peak learning rate (cosine decay)
    sft_epochs: int = 1             # the M-step's epochs over the kept self-edits
    sft_batch: int = 1              # the M-step's sequences per optimizer step
    ttt_base: str = "policy"        # the model the inner loop adapts after ReST-EM: "policy" (official: the merged
                                    # M-step model samples and is adapted) or "base" (the policy is a second model
                                    # that only samples; TTT keeps adapting the base model: docs/official.md §4.2)
    max_len: int = 8192             # the longest training sequence in tokens (longer ones are left out)
    eval_batch: int = 32            # prompts per batch when decoding

    @property
    def fingerprint(self):
        """Settings that change results: a run folder refuses to resume under different values."""
        kept = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("out", "device", "compile")}
        return {"config": type(self).__name__, "records": RECORDS, **kept}


# -----------------------------------------------------------------------------
# The domain contract. A domain (domains/arc.py, domains/knowledge.py) subclasses Domain; the loop below
# knows no domain by name.

# Where a row's self-edits come from (Row.source)
NONE = "none"           # no self-edit: the model as it is, no adaptation
FIXED = "fixed"         # Row.text for every item (e.g. "" trains on the item's own data alone)
CONTROL = "control"     # a text the domain writes for each item (Domain.control_text), e.g. an oracle's
BASE = "base"           # sampled from the base policy
TEACHER = "teacher"     # sampled from --teacher (the paper's GPT-4.1 row)
POOLED = "pooled"       # the BASE row's self-edits of all evaluation items trained into one adapter, then every
                        # item evaluated (continued pretraining)
RL = "rl"               # sampled from the policy after ReST-EM round Row.after_round (0: the last, cfg.rounds)


@dataclass(frozen=True)
class Row:
    """One row of a results table: every evaluation item's self-edit from `source`, through the inner loop."""
    key: str
    label: str
    paper: str              # the paper's number for this row, as printed there
    source: str = NONE
    text: str = ""          # the self-edit of a FIXED row
    after_round: int = 0    # an RL row's round (0: the last)


class Domain:
    """What the loop asks of a domain. Items are string ids; records are the dicts evaluate() returns, plus
    phase, item, k, text (and the defaults of `with_defaults`)."""
    rows: tuple = ()
    score_name = "score"    # what the log calls a record's "score", the number the results table counts
    template = None         # a sample_template template (fields forced, values sampled), or None: free text
    answer_prefix = ""      # text every sampled answer starts with; part of the self-edit that is parsed

    def __init__(self, cfg, tok):
        self.cfg, self.tok = cfg, tok
        self.rl_items, self.eval_items = [], []

    def prompt_ids(self, item, tok) -> list:
        """The self-edit prompt for `item`, as token ids of `tok` (the teacher's tokenizer for the teacher row)."""
        raise NotImplementedError

    @property
    def reward_name(self) -> str:
        """What the log calls a record's "reward", the number `select` ranks by (by default the table's score)."""
        return self.score_name

    def evaluate(self, m, adapter, item, text, seed) -> dict:
        """The reward of one self-edit: train `adapter` (zeroed by the loop) as `text` directs, score `m`.
        text None means no adaptation. Returns at least {"reward": float}, what `select` ranks by, and "score",
        what the results table counts, where that is another number; "valid" False and a "reason" mark a
        self-edit that could not be used (it scores 0). Both are finite (a record without is refused before it is
        written), by convention in [0, 1]; the default `select` keeps reward == 1 only, so a graded reward
        overrides it."""
        raise NotImplementedError

    def evaluate_pooled(self, m, adapter, items, texts, seed) -> dict:
        """The POOLED row's one record: every item's self-edit trained into one adapter, then every item scored.
        Returns {"score", "weight": len(items), ...}; no "reward", since nothing selects it."""
        raise NotImplementedError(f"{type(self).__name__} has no pooled row")

    def sample(self, m, tok, prompts, n, temperature, seeds) -> list:
        """n self-edits (token ids) per prompt, prompt j's from seeds[j]: by the template when there is one (keys
        forced, values the model's), else freely. A domain with another constrained format overrides this."""
        if self.template is not None:
            return [o for p, s in zip(prompts, seeds) for o in sample_template(m, tok, p, self.template, n,
                                                                                temperature, seed=s)]
        return generate_ids(m, tok, prompts, self.cfg.se_max_tokens, temperature, self.cfg.se_top_p, n, seed=seeds)

    def evaluation_seed(self, phase, item, k) -> int:
        """The seed evaluate() gets for self-edit k of `item` in `phase`. By default each self-edit's own (its
        name): its inner loop is an independent draw. A domain whose reward should be a function of (item,
        self-edit), as ARC's official run, returns one seed per item (domains/arc.py)."""
        return stable_seed(self.cfg.seed, phase, item, k)

    def self_edit_key(self, text):
        """What makes two self-edits the same (by default the text; ARC: the parsed configuration). The loop
        evaluates jobs of one phase with the same item, key and evaluation_seed once (evaluate_phase)."""
        return text

    def control_text(self, row_key, item) -> str:
        """The self-edit of a CONTROL row for one item: a text the domain writes, not the policy."""
        raise NotImplementedError(f"{type(self).__name__} has no control row {row_key!r}")

    def rl_items_for_round(self, r) -> list:
        """The RL items of ReST-EM round r (the official knowledge run draws a new batch each round)."""
        return self.rl_items

    def select(self, records) -> list:
        """The E-step filter (paper section 3.1); ARC's: keep every self-edit with reward 1."""
        return keep_rewarded(records)

    def choices(self, records) -> dict:
        """What the self-edits chose, counted per setting ({setting: {value: count}}), for the report."""
        return {}

    def metrics(self, records) -> dict:
        """Other means to print beside the reward ({name: value}), e.g. each grader's accuracy."""
        return {}


def keep_rewarded(records):
    return [r for r in records if r["reward"] == 1]


def best_per_item(records, score=lambda r: r["reward"], bar=None, skip_ties=False):
    """The best self-edit of each item by score (the reward by default), even one below the no-adaptation score
    (the official knowledge run's top-1 of 5, docs/official.md §2.6). Ties go to the first sampled. bar: a record's
    score to beat (e.g. the model's before training), below or at which the best is not kept; skip_ties: leave out
    an item whose self-edits all score alike, which gives the M-step nothing to tell apart."""
    best, scores = {}, {}
    for r in records:
        scores.setdefault(r["item"], set()).add(score(r))
        if r["item"] not in best or score(r) > score(best[r["item"]]):
            best[r["item"]] = r
    return [r for item, r in best.items()
            if not (skip_ties and len(scores[item]) == 1) and (bar is None or score(r) > bar(r))]


def with_defaults(res) -> dict:
    """An evaluation's result with what a domain may leave out: valid, no reason, weight 1 (a pooled record stands
    for all its items' questions), and the table's score equal to the reward. Applied once, as the record is made,
    so every reader of records finds every key."""
    rec = {"valid": True, "reason": "", "weight": 1, **res}
    rec.setdefault("score", rec.get("reward"))
    return rec


def describe(domain, records) -> str:
    """The records' mean reward under its name, and the table's score beside it where that is another number, e.g.
    "reward (sampled) 0.31, greedy lenient 0.2"."""
    mean = lambda key: sum(r[key] for r in records) / max(1, len(records))
    out = f"reward ({domain.reward_name}) {mean('reward'):.3g}"
    return out if domain.reward_name == domain.score_name else f"{out}, {domain.score_name} {mean('score'):.3g}"


def stable_seed(*parts) -> int:
    """A seed from names, independent of Python's hash randomisation and of evaluation order."""
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


def phase_tag(phase, ranks=None) -> str:
    """A log line's prefix: the phase, and this process's rank under torchrun."""
    return f"[{phase}]" if ranks is None or ranks.world == 1 else f"[{phase} rank {ranks.rank}]"


# -----------------------------------------------------------------------------
# The model's one owner, and ReST-EM


class Learner:
    """Owns the model's life: loads it, injects the inner-loop adapter once, zeroes it before every self-edit and
    every sampling (so the policy is always the plain model), takes it out for the M-step and puts it back. Under
    --ttt_base=base the M-step's policy is a second model (`sampler`) and the inner loop keeps adapting the first."""

    def __init__(self, cfg: RunConfig, name_or_path: str):
        settings.check_choice("ttt_base", cfg.ttt_base, ("policy", "base"))
        self.cfg = cfg
        self.device, self.dtype = settings.device_and_dtype(cfg)
        self.m = self.adapter = self.sampler = None  # sampler None: the policy is self.m
        self.load(name_or_path)

    def _read(self, name_or_path):
        m, self.tok = checkpoint.load(name_or_path, device=self.device, dtype=self.dtype)
        if self.cfg.compile:
            m.compile_hot_paths()
        return m

    def load(self, name_or_path):
        """A policy: also the model the inner loop adapts, except under --ttt_base=base once a model is loaded."""
        if self.m is not None and self.cfg.ttt_base == "base":
            self.sampler = None  # free the old policy before reading the new one
            self.sampler = self._read(name_or_path)
            return
        if self.adapter is not None:
            self.adapter.remove()
        self.m = None  # free the old weights before reading the new ones
        self.m = self._read(name_or_path)
        self.inject()

    def inject(self):
        # the same initial A before every self-edit, as the official run's reset_lora (docs/official.md §1.5)
        self.adapter = lora.inject(self.m, r=self.cfg.inner_rank, alpha=self.cfg.inner_alpha,
                                   targets=self.cfg.inner_targets.split(","), seed=self.cfg.seed)

    def policy(self):
        """What samples self-edits: the model with a zero adapter, i.e. exactly its weights, or the separate policy."""
        if self.sampler is not None:
            return self.sampler
        self.adapter.reset()
        return self.m

    def evaluate(self, domain, item, text, seed):
        self.adapter.reset()
        return domain.evaluate(self.m, self.adapter, item, text, seed)

    def evaluate_pooled(self, domain, items, texts, seed):
        self.adapter.reset()
        return domain.evaluate_pooled(self.m, self.adapter, items, texts, seed)

    def merge_adapter(self):
        """Fold the inner-loop adapter into the weights for good (the forgetting experiment), then a fresh one."""
        self.adapter.merge()
        self.inject()

    def m_step(self, records, phase, save_to):
        """ReST-EM M-step: supervised LoRA fine-tune on the kept (prompt, self-edit) pairs, loss on the self-edit
        tokens only, merged into the weights (official ARC: r16 alpha16 lr 5e-5, 8 epochs, batch 5, cosine).
        The new policy is saved to `save_to` (a hub-style folder) before the inner-loop adapter goes back in.
        Returns what the run folder records of it (m_step.json)."""
        cfg = self.cfg
        apart = cfg.ttt_base == "base"
        if apart and self.sampler is None:  # the first M-step: the policy leaves the model the inner loop adapts
            self.sampler = self._read(cfg.model)
        if not apart:
            self.adapter.remove()  # the inner-loop adapter is not part of the policy
        policy = self.sampler if apart else self.m
        examples = [(r["prompt_ids"], r["ids"] + [self.tok.eos_id]) for r in records]
        sft = lora.inject(policy, r=cfg.sft_rank, alpha=cfg.sft_alpha, targets=cfg.sft_targets.split(","),
                          seed=stable_seed(cfg.seed, phase))
        res = lora.train(policy, examples, lr=cfg.sft_lr, epochs=cfg.sft_epochs, batch_size=cfg.sft_batch,
                         loss_on="completion", schedule="cosine", warmup=0, seed=stable_seed(cfg.seed, phase),
                         adapter=sft, max_len=cfg.max_len,  # KnowledgeConfig's setting: ARC's fingerprint stays
                         target_loss=getattr(cfg, "sft_target_loss", 0.0) or None)
        sft.merge()
        checkpoint.save(policy, save_to, tokenizer_dir=checkpoint.resolve(self.cfg.model))
        if not apart:
            self.inject()
        ends = res.loss_ends()
        loss = f"loss {ends['loss_first']:.3f} -> {ends['loss_last']:.3f}" if res.losses else "no step"
        print(f"[{phase}] M-step on {len(examples)} self-edits: {res.steps} steps, {loss}, {fmt_time(res.seconds)}",
              flush=True)
        return {"examples": len(examples), "items": [r["item"] for r in records], "steps": res.steps,
                "losses": res.losses, "seconds": res.seconds}


def sample_self_edits(m, tok, domain, items, n, cfg, phase, ranks=None, temperature=None):
    """E-step sampling: n self-edits per item at `temperature` (default --se_temperature; one prefill per item).
    Each item's samples are seeded by the item alone, so they do not depend on the batching (--eval_batch) or, under
    torchrun, on the number of processes: every rank samples every world-th item and all ranks gather the lot."""
    temperature = cfg.se_temperature if temperature is None else temperature
    prompts = [domain.prompt_ids(it, tok) for it in items]
    rank, world = (ranks.rank, ranks.world) if ranks else (0, 1)
    seeds = [stable_seed(cfg.seed, phase, it) for it in items]
    own = list(range(len(items)))[rank::world]
    size = max(1, cfg.eval_batch // n)
    t0 = time.time()
    mine = {}
    for b in range(0, len(own), size):
        batch = own[b:b + size]
        outs = domain.sample(m, tok, [prompts[i] for i in batch], n, temperature, [seeds[i] for i in batch])
        mine.update({i: outs[j * n:(j + 1) * n] for j, i in enumerate(batch)})
    dt = time.time() - t0
    ntok = sum(len(o) for outs in mine.values() for o in outs)
    print(f"{phase_tag(phase, ranks)} sampled {sum(map(len, mine.values()))} self-edits in {fmt_time(dt)} "
          f"({ntok / max(dt, 1e-9):.0f} tok/s)", flush=True)
    outs = {}
    for part in (ranks.all_gather(mine) if ranks else [mine]):
        outs.update(part)
    return [{"item": it, "k": k, "prompt_ids": prompts[j], "ids": outs[j][k],
             "text": domain.answer_prefix + tok.decode(outs[j][k])}
            for j, it in enumerate(items) for k in range(n)]


def first_occurrences(keys) -> list:
    """For each position, the position of the first equal key."""
    seen = {}
    return [seen.setdefault(key, i) for i, key in enumerate(keys)]


def checked(domain, rec, keys=("reward", "score")) -> dict:
    """rec, once the numbers the loop reads from it are finite. A record is written once and read back on every
    resume, so a domain's missing or non-finite reward stops the run here, before the run folder holds it: the fixed
    domain then resumes the same folder."""
    for key in keys:
        value = rec.get(key)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{type(domain).__name__}.evaluate returned {key}={value!r} for item {rec['item']!r} in "
                             f"phase {rec['phase']!r}: a record needs a finite number (a Python float) under "
                             f"{key!r}; nothing was written")
    return rec


def job_record(domain, phase, job, res) -> dict:
    rec = {"phase": phase, "item": job["item"], "k": job["k"], "text": job["text"], **with_defaults(res)}
    if "ids" in job:  # the M-step trains on the sampled tokens
        rec["prompt_ids"], rec["ids"] = job["prompt_ids"], job["ids"]
    return checked(domain, rec)


def evaluate_phase(folder, learner, domain, phase, jobs, cfg, progress=None):
    """The inner loop and the reward of every (item, k, self-edit) not already in the run folder. Jobs that would
    give the same evaluation (one item, one domain.self_edit_key, one domain.evaluation_seed) are evaluated once,
    at the first of them in the phase's job list; each later one gets a copy of its record marked "shared_with":
    its k. Under torchrun this rank takes every world-th of the distinct evaluations (by position, so it does not
    depend on what is done) and writes their copies itself, so no rank waits on another before the phase's sync;
    on a resume, a copy whose evaluation is in the run folder is written without evaluating again."""
    ranks = folder.ranks
    seeds = [domain.evaluation_seed(phase, j["item"], j["k"]) for j in jobs]
    first = first_occurrences([(j["item"], domain.self_edit_key(j["text"]), s) for j, s in zip(jobs, seeds)])
    copies = {}  # position of a distinct evaluation -> the positions that share its record
    for c, f in enumerate(first):
        copies.setdefault(f, []).extend([c] if c != f else [])
    mine = list(copies)[ranks.rank::ranks.world]
    done = lambda i: (phase, jobs[i]["item"], jobs[i]["k"]) in folder.done
    todo = [i for i in mine if not done(i)]
    tag = phase_tag(phase, ranks)
    if todo:
        print(f"{tag} {len(mine) - len(todo)}/{len(mine)} distinct self-edits already done; evaluating {len(todo)}",
              flush=True)
    t0, n = time.time(), 0
    own = ("phase", "item", "k", "text", "prompt_ids", "ids", "seconds")  # what a shared record does not copy
    for i in mine:
        j = jobs[i]
        if not done(i):
            t1, n = time.time(), n + 1
            res = learner.evaluate(domain, j["item"], j["text"], seed=seeds[i])
            rec = job_record(domain, phase, j, {**res, "seconds": round(time.time() - t1, 2)})
            folder.log(rec)
            eta = (time.time() - t0) / n * (len(todo) - n)
            why = "" if rec["valid"] else f" ({rec['reason']})"
            whole = f"; {progress.tick(rec['seconds'])}" if progress else ""
            print(f"{tag} {n}/{len(todo)} {j['item']} #{j['k']}: {describe(domain, [rec])}{why}; "
                  f"{rec['seconds']:.0f}s, ETA {fmt_time(eta)}{whole}", flush=True)
        rec = folder.done[(phase, j["item"], j["k"])]
        for c in copies[i]:
            if not done(c):  # written right after its evaluation, or on the resume after a kill between the two
                shared = {key: v for key, v in rec.items() if key not in own}
                folder.log(job_record(domain, phase, jobs[c], {**shared, "shared_with": j["k"], "seconds": 0.0}))
                whole = f"; {progress.tick(None)}" if progress else ""
                print(f"{tag} {j['item']} #{jobs[c]['k']}: the same self-edit as #{j['k']}, its record shared{whole}",
                      flush=True)
    folder.sync()
    return [folder.done[(phase, j["item"], j["k"])] for j in jobs]


def pick_rows(domain, keys: str, cfg):
    """The rows asked for by key. By default all of them, less the teacher row when no --teacher is given and
    less an RL row of round >= --rounds (the final RL row is that policy already)."""
    known = [r.key for r in domain.rows]
    redundant = lambda r: r.source == TEACHER and not cfg.teacher or r.source == RL and r.after_round >= cfg.rounds
    wanted = keys.split(",") if keys else [r.key for r in domain.rows if not redundant(r)]
    for k in wanted:
        settings.check_choice("rows", k, known)
    rows = [r for r in domain.rows if r.key in wanted]
    sources = {r.source for r in rows}
    if TEACHER in sources and not cfg.teacher:
        raise SystemExit("the teacher row needs --teacher=MODEL (or leave it out of --rows)")
    if POOLED in sources and BASE not in sources:
        pooled = next(r.key for r in rows if r.source == POOLED)
        raise SystemExit(f"the {pooled} row pools the base-policy row's self-edits: ask for that row too")
    if RL in sources and cfg.rounds < 1:
        raise SystemExit("a row after ReST-EM needs --rounds of at least 1")
    return rows


def schedule(rows, cfg) -> list:
    """The run's steps in order: each row on the base model (a Row), then each ReST-EM round (its number, up to the
    last round an RL row needs) followed by the RL rows of that round (the rounds change the policy's weights)."""
    rl_round = lambda row: min(row.after_round or cfg.rounds, cfg.rounds)
    last_round = max((rl_round(row) for row in rows if row.source == RL), default=0)
    steps = [row for row in rows if row.source != RL]
    for r in range(1, last_round + 1):
        steps += [r] + [row for row in rows if row.source == RL and rl_round(row) == r]
    return steps


def check_items(domain, steps):
    """Stop before anything runs when the schedule would meet an empty item list: a run with nothing to evaluate
    would succeed with every row at 0/0."""
    name = type(domain).__name__
    if not domain.eval_items:
        raise SystemExit(f"{name} has no eval_items: its __init__ sets self.eval_items, a list of item ids")
    for r in (step for step in steps if not isinstance(step, Row)):
        if not domain.rl_items_for_round(r):
            raise SystemExit(f"{name} has no RL items for ReST-EM round {r}: its __init__ sets self.rl_items, a list "
                             f"of item ids (or rl_items_for_round({r}) gave none)")


def planned_evaluations(domain, steps, cfg) -> int:
    """How many inner-loop evaluations the schedule's steps make: each row's and each ReST-EM round's."""
    def count(step):
        if not isinstance(step, Row):  # a round: every RL item's samples
            return len(domain.rl_items_for_round(step)) * cfg.rl_samples
        if step.source == POOLED:  # one training run on all items, not ticked
            return 0
        return len(domain.eval_items) * (cfg.eval_samples if step.source in (BASE, TEACHER, RL) else 1)
    return sum(map(count, steps))


def evaluate_row(folder, learner, domain, cfg, row, table, progress=None):
    """One row of the table: every evaluation item's self-edit(s), from where row.source says, through the inner
    loop. table: the rows evaluated before it, {Row: records} (the POOLED row trains the BASE row's self-edits)."""
    items, phase = domain.eval_items, row.key
    if row.source == POOLED:  # one job, on rank 0: every item's base-policy self-edit in one adapter
        texts = [r["text"] for r in next(recs for b, recs in table.items() if b.source == BASE) if r["k"] == 0]
        seed = stable_seed(cfg.seed, phase)
        pooled = lambda: checked(domain, {"phase": phase, "item": "all", **with_defaults(
            learner.evaluate_pooled(domain, items, texts, seed))}, keys=("score",))
        return [folder.once(phase, pooled)]
    if row.source in (NONE, FIXED, CONTROL):
        text = lambda it: (None if row.source == NONE else row.text if row.source == FIXED
                           else domain.control_text(row.key, it))
        return evaluate_phase(folder, learner, domain, phase, [{"item": it, "k": 0, "text": text(it)}
                                                               for it in items], cfg, progress)

    def sample():  # BASE and RL: the policy as it is now; TEACHER: --teacher
        # Every rank samples its share of the items, so every rank needs the teacher: it is loaded here, on each
        # rank, and only when the samples are not in the run folder yet (sample() is not called then).
        m, tok = (checkpoint.load(cfg.teacher, device=learner.device, dtype=learner.dtype)
                  if row.source == TEACHER else (learner.policy(), learner.tok))
        return sample_self_edits(m, tok, domain, items, cfg.eval_samples, cfg, phase, folder.ranks)
    recs = evaluate_phase(folder, learner, domain, phase, folder.samples(phase, sample), cfg, progress)
    if folder.ranks.main:
        print(f"[{phase}] valid self-edits {sum(r['valid'] for r in recs)}/{len(recs)}, mean "
              f"{describe(domain, recs)}", flush=True)
    return recs


def run(cfg: RunConfig, domain_cls):
    """The whole experiment for one domain, as its schedule: the rows on the base model, the ReST-EM rounds, each
    row after ReST-EM once its round is done, then the table. Every finished step is in the run folder, from which
    the same command resumes."""
    torch.manual_seed(cfg.seed)
    ranks = Ranks()
    hold_lock(cfg.out, ranks.rank)  # before the model loads: a second launch on a folder in use stops at once
    learner = Learner(cfg, cfg.model)
    domain = domain_cls(cfg, learner.tok)
    rows = pick_rows(domain, cfg.rows, cfg)
    steps = schedule(rows, cfg)
    check_items(domain, steps)
    folder = RunFolder(cfg, items={"rl": domain.rl_items, "eval": domain.eval_items}, ranks=ranks)
    print(f"run folder {folder.dir}; model {cfg.model} on {learner.device} ({learner.dtype}); "
          f"{type(domain).__name__}: {len(domain.rl_items)} RL and {len(domain.eval_items)} evaluation items"
          + (f"; rank {ranks.rank} of {ranks.world}" if ranks.world > 1 else ""), flush=True)
    progress = Progress(planned_evaluations(domain, steps, cfg), done=len(folder.done), world=ranks.world)
    table = {}  # Row -> its evaluation records
    for step in steps:
        if isinstance(step, Row):
            table[step] = evaluate_row(folder, learner, domain, cfg, step, table, progress)
        else:
            rest_em_round(folder, learner, domain, cfg, step, progress)
    return report(folder, cfg, domain, rows, table, with_rounds=any(r.source == RL for r in rows))


def rest_em_round(folder, learner, domain, cfg, r, progress=None):
    """One ReST-EM round (paper section 3.1), its steps in order: sample self-edits for the round's RL items from
    the policy; the inner loop and reward of each; the E-step keeps the rewarded; the M-step fine-tunes the policy on
    them. A round the run folder holds as finished is not run again; a new policy it made is loaded."""
    phase, fine_tuned_here = f"rl{r}", False
    if folder.round_state(r) == PENDING:
        items, temperature = domain.rl_items_for_round(r), cfg.rl_temperature or cfg.se_temperature
        samples = folder.samples(phase, lambda: sample_self_edits(  # sample (written once, read back on a resume)
            learner.policy(), learner.tok, domain, items, cfg.rl_samples, cfg, phase, folder.ranks, temperature))
        rewarded = evaluate_phase(folder, learner, domain, phase, samples, cfg, progress)  # inner loop + reward
        kept = domain.select(rewarded)                                                      # E-step
        if folder.ranks.main:
            print(f"[{phase}] keeping {len(kept)}/{len(rewarded)} self-edits for the M-step", flush=True)
        m_step = (lambda save_to: learner.m_step(kept, phase, save_to)) if kept else None
        folder.finish_round(r, m_step)  # M-step: rank 0 fine-tunes and saves the policy, the other ranks wait
        fine_tuned_here = folder.ranks.main and m_step is not None
    if folder.round_state(r) == NEW_POLICY and not fine_tuned_here:  # a resumed round, or rank 0's M-step
        learner.load(str(folder.policy_dir(r)))
        print(f"[{phase}] policy loaded from {folder.policy_dir(r)}", flush=True)
