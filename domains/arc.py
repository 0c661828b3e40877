"""
ARC as a SEAL domain (paper section 4.2, Table 1): the self-edit is a JSON training configuration for
test-time training (which augmentations, which loss, learning rate, epochs); its reward is 1 when the model
adapted by it solves the task's held-out test input (pass@2 after voting), else 0.

    python -m domains.arc run --split=tiny --out=runs/arc-tiny        # what `bash train.sh arc` calls
    python -m domains.arc filter --configs=basic+size+chain+repeat:output:3e-3:6 --max_side=5   # split-making
    python -m domains.arc policy --split=tiny --se_mode=schema         # what a model's self-edits would choose

The self-edit schema (docs/official.md §1.2) is written once, in FIELDS: the prompt's skeleton, the schema-mode
template, SelfEdit.to_dict and the parser derive from it. The TTT toolkit lives in arc_ttt.py.
"""
import json
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

import lora
import sampling
import seal
import settings
from domains import arc_ttt as ttt

DATA = Path(__file__).resolve().parent.parent / "data" / "arc"


@dataclass
class ArcConfig(seal.RunConfig):
    """The official ARC run's settings (docs/official.md §1.2-1.7); the CPU preset lives in train.sh."""
    out: str = "runs/arc"
    split: str = "paper"            # data/arc/<split>.json, or a path to such a file
    rl_samples: int = 15
    eval_samples: int = 5
    se_temperature: float = 0.8
    inner_rank: int = 128
    inner_alpha: float = 16.0
    inner_targets: str = "q_proj,v_proj,gate_proj,up_proj,down_proj"
    sft_targets: str = "q_proj,v_proj,gate_proj,up_proj,down_proj"
    sft_epochs: int = 8
    sft_batch: int = 5
    fmt: str = "numpy"              # grid text: "numpy" (official) or "compact"
    warmup: int = 11
    batch_size: int = 2
    max_examples: int = 250
    max_steps: int = 375            # self-edits that would train longer are invalid (reward 0), as in the paper
    lr_hint: str = "between 1e-5 and 1e-3"
    oracle: str = "basic+size+chain+repeat:output:1e-4:2"   # the fixed TTT config of the oracle row (SelfEdit spec)
    se_mode: str = "free"           # "free": the model writes the JSON (official); "prefix": its answer starts with
                                    # the skeleton's first key; "schema": keys forced, values sampled among valid ones
    se_lr_options: str = "1e-5,3e-5,1e-4,3e-4,1e-3"  # the learning rates offered in schema mode
    se_epoch_options: str = "1,2,3,4,5"   # the epoch counts offered in schema mode
    reward: str = "solved"          # what the E-step ranks: "solved" (official: 1 if pass@2 solves the task, else 0;
                                    # keep every solved self-edit) or "graded" (solved ranks first, then the true
                                    # output's teacher-forced token accuracy; keep the best of each task where it
                                    # beats the unadapted model: docs/arc.md "The graded reward")

    @property
    def fingerprint(self):
        """A run folder made when each self-edit drew its own TTT data (before Arc.evaluation_seed) gave rewards of
        another kind: it must not resume into one draw per task."""
        return {**super().fingerprint, "ttt_draw": "per task"}


# -----------------------------------------------------------------------------
# The self-edit (docs/official.md §1.2): its schema, the prompt, the parser

# (section, key, kind, SelfEdit attribute), in the order the JSON is written
FIELDS = ([("data_generation", f"use_{g}_augmentations", "bool", g) for g in ttt.AUG_GROUPS] +
          [("training", "strategy", "strategy", "loss"), ("training", "learning_rate", "float", "lr"),
           ("training", "num_train_epochs", "int", "epochs")])
STRATEGIES = {"train_using_all_tokens": "all", "train_using_output_tokens": "output"}
_HOLES = {"bool": "<true|false>", "strategy": '"<' + "|".join(STRATEGIES) + '>"', "float": "<float>", "int": "<int>"}


def _walk(fill):
    """The schema as [(text before the value, fill(kind))...] plus the closing text. The skeleton fills holes
    with placeholders, the template with option lists."""
    parts, before, section = [], "{", None
    for sec, key, kind, _ in FIELDS:
        if sec != section:
            before += ("}, " if section else "") + f'"{sec}": {{'
            section = sec
        else:
            before += ", "
        parts.append((before + f'"{key}": ', fill(kind)))
        before = ""
    return parts, "}}"


def skeleton() -> str:
    parts, end = _walk(_HOLES.get)
    return "".join(t + hole for t, hole in parts) + end


SKELETON = skeleton()
SKELETON_PREFIX = _walk(_HOLES.get)[0][0][0]  # what the answer starts with in "prefix" mode


def template(lr_options, epoch_options) -> list:
    """The schema with holes, for sampling.sample_template. SmolLM2-135M wrote 0 valid self-edits of 8 freely, even
    with the skeleton's first key given (it invents keys, writes 0.1 for booleans): a self-edit that never parses
    earns no reward and ReST-EM has nothing to learn from. Forcing the keys keeps the choices with the model."""
    options = {"bool": ["true", "false"], "strategy": [f'"{s}"' for s in STRATEGIES],
               "float": list(lr_options), "int": list(epoch_options)}
    parts, end = _walk(options.get)
    return parts + [(end, None)]


@dataclass(frozen=True)
class SelfEdit:
    basic: bool
    size: bool
    chain: bool
    repeat: bool
    loss: str            # "all" | "output"
    lr: float
    epochs: int

    @property
    def aug(self) -> dict:
        return {g: getattr(self, g) for g in ttt.AUG_GROUPS}

    def to_dict(self) -> dict:
        out = {}
        for sec, key, kind, attr in FIELDS:
            v = getattr(self, attr)
            out.setdefault(sec, {})[key] = next(s for s, x in STRATEGIES.items() if x == v) if kind == "strategy" else v
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_spec(cls, spec: str) -> "SelfEdit":
        """'basic+size:output:3e-3:6' (augmentation groups or none, loss all|output, lr, epochs): the short form
        the oracle setting and the filter take."""
        try:
            aug, loss, lr, epochs = spec.split(":")
            groups = set() if aug == "none" else set(aug.split("+"))
            if groups - set(ttt.AUG_GROUPS) or loss not in ("all", "output"):
                raise ValueError
            return cls(*(g in groups for g in ttt.AUG_GROUPS), loss, float(lr), int(epochs))
        except ValueError:
            raise SystemExit(f"self-edit spec {spec!r}: expected groups:loss:lr:epochs, groups '+'-joined from "
                             f"{', '.join(ttt.AUG_GROUPS)} or none, loss all or output "
                             f"(e.g. basic+size:output:3e-3:6)") from None


_SELF_EDIT_SYSTEM = "You are a helpful assistant. Reply right away with the answer only."
_SELF_EDIT_TASK = """\
The examples above show one puzzle. A small model will be fine-tuned on them before it solves a new input, \
and you decide how, using a fixed set of tools.

Data generation: four kinds of augmented copies of the examples can be added to the training data.
- use_basic_augmentations: rotations, flips, mirrored doublings, small shifts and the transpose
- use_size_augmentations: the grids scaled up 2x in both directions, in height only or in width only
- use_chain_augmentations: a rotation, flip or transpose followed by a 2x scale-up
- use_repeat_augmentations: the grids tiled twice vertically, horizontally or both ways

Training:
- strategy: "train_using_all_tokens" (learn from the whole prompt) or "train_using_output_tokens" (learn \
from the answers only)
- learning_rate: a float, {lr_hint}
- num_train_epochs: an integer number of passes over the data{epoch_hint}

Answer with pure JSON and nothing else, in exactly this shape, booleans written as lowercase true/false:
{skeleton}"""


def self_edit_prompt(task: ttt.Task, fmt: str = "numpy", lr_hint: str = "between 1e-5 and 1e-3",
                     epoch_hint: str = "") -> list[dict]:
    """Chat messages asking for a self-edit. Shows the demonstrations only, never the test input.

    Grids are rows of digits, space-separated for "numpy" (the official self-edit prompt) or not for "compact".
    """
    ttt._check_fmt(fmt)
    sep = " " if fmt == "numpy" else ""
    rows = lambda g: "".join(sep.join(str(int(v)) for v in row) + "\n" for row in np.asarray(g))
    demos = "".join(f"Input:\n{rows(i)}\nOutput:\n{rows(o)}\n" for i, o in task.train)
    task_text = _SELF_EDIT_TASK.format(lr_hint=lr_hint, epoch_hint=epoch_hint and ", " + epoch_hint, skeleton=SKELETON)
    user = demos + "------\n\n" + task_text
    return [{"role": "system", "content": _SELF_EDIT_SYSTEM}, {"role": "user", "content": user}]


class _Invalid(ValueError):
    pass


_JSON_MARKS = re.compile(r'[{}\[\]"\\]')
_MAX_DEPTH, _MAX_SCAN = 16, 100_000


def _first_object(text: str) -> tuple[str | None, str]:
    """The first balanced {...} in text (brackets inside strings ignored), or (None, reason)."""
    start = text.find("{")
    if start < 0:
        return None, "no JSON object"
    depth, in_string, skip = 0, False, -1
    for m in _JSON_MARKS.finditer(text, start, start + _MAX_SCAN):
        i, ch = m.start(), m.group()
        if i < skip:                                   # the character after a backslash
            continue
        if in_string:
            if ch == "\\":
                skip = i + 2
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
            if depth > _MAX_DEPTH:
                return None, "JSON nested too deeply"
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return text[start:i + 1], ""
    return None, "unterminated JSON object"


def _reject_constant(name):
    raise _Invalid(f"non-finite number {name}")


def _unique_keys(pairs):
    obj = {}
    for k, v in pairs:
        if k in obj:
            raise _Invalid(f"duplicate key {k[:40]!r}")
        obj[k] = v
    return obj


def _number(value, what) -> tuple[float | None, str]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None, f"{what} is not a number"
    try:
        value = float(value)
    except OverflowError:
        return None, f"{what} is not finite"
    return (value, "") if math.isfinite(value) else (None, f"{what} is not finite")


def parse_self_edit(text, lr_range=(0.0, 1.0), epoch_range=(1, 100)) -> tuple[SelfEdit | None, str]:
    """(SelfEdit, "ok") or (None, short reason). Never raises; JSON only (no eval).

    Accepts a full answer, or SKELETON_PREFIX + the model's continuation; text after the object is ignored.
    Stricter than the official json.loads: duplicate keys, NaN/Infinity and bools given as strings are
    rejected; learning_rate must lie in (lr_range[0], lr_range[1]], epochs in epoch_range (inclusive).
    """
    try:
        return _parse_self_edit(text, lr_range, epoch_range)
    except Exception as e:                             # belt and braces: a bad sample must never stop a run
        return None, f"unparseable ({type(e).__name__})"


def _parse_self_edit(text, lr_range, epoch_range):
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if not isinstance(text, str):
        return None, "not a string"
    raw, reason = _first_object(text)
    if raw is None:
        return None, reason
    try:
        obj = json.loads(raw, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except _Invalid as e:
        return None, str(e)
    except (ValueError, RecursionError):
        return None, "invalid JSON"
    for sec in dict.fromkeys(s for s, _, _, _ in FIELDS):
        if sec not in obj:
            return None, f"missing key {sec}"
        if not isinstance(obj[sec], dict):
            return None, f"{sec} is not an object"
    for sec, key, _, _ in FIELDS:  # every key is checked for presence before any value
        if key not in obj[sec]:
            return None, f"missing key {sec}.{key}"
    values = {}
    for sec, key, kind, attr in FIELDS:
        v, name = obj[sec][key], f"{sec}.{key}"
        if kind == "bool":
            if not isinstance(v, bool):
                return None, f"{name} is not true/false"
        elif kind == "strategy":
            if not isinstance(v, str) or v not in STRATEGIES:
                return None, f"unknown {name}"
            v = STRATEGIES[v]
        else:
            v, reason = _number(v, name)
            if v is None:
                return None, reason
            lo, hi = lr_range if kind == "float" else epoch_range
            if kind == "int" and not v.is_integer():
                return None, f"{name} is not an integer"
            if not (lo < v <= hi if kind == "float" else lo <= v <= hi):
                return None, (f"{name} {v:g} outside ({lo:g}, {hi:g}]" if kind == "float"
                              else f"{name} {v:g} outside [{lo}, {hi}]")
            v = int(v) if kind == "int" else v
        values[attr] = v
    return SelfEdit(**values), "ok"


# -----------------------------------------------------------------------------
# The domain


class Arc(seal.Domain):
    """One self-edit = one TTT run: its JSON picks the augmentations and training settings, the adapter the loop
    hands over is trained on the resulting data, and the adapted model answers the test input(s)."""

    def __init__(self, cfg: ArcConfig, tok):
        super().__init__(cfg, tok)
        path = Path(cfg.split) if cfg.split.endswith(".json") else DATA / f"{cfg.split}.json"
        if not path.exists():
            raise SystemExit(f"no ARC split {cfg.split!r}: expected {path}")
        split = json.loads(path.read_text())
        self.rl_items = split["rl"]
        self.eval_items = split.get("eval_scored", split["eval"])  # paper: the 8 scored tasks, so k/40
        self.tasks = ttt.load_tasks(self.rl_items + self.eval_items)
        settings.check_choice("se_mode", cfg.se_mode, ("free", "prefix", "schema"))
        settings.check_choice("reward", cfg.reward, ("solved", "graded"))
        self.answer_prefix = SKELETON_PREFIX if cfg.se_mode == "prefix" else ""
        lrs, epochs = cfg.se_lr_options.split(","), cfg.se_epoch_options.split(",")
        self.template = template(lrs, epochs) if cfg.se_mode == "schema" else None
        # the prompt must offer what can be chosen: in schema mode, exactly the values of the template
        # (a first tiny run whose prompt said "between 1e-5 and 1e-3" sampled 1e-3 every time of 28)
        self.lr_hint = ("one of " + ", ".join(lrs)) if self.template else cfg.lr_hint
        self.epoch_hint = ("one of " + ", ".join(epochs)) if self.template else ""
        self.rows = (seal.Row("icl", "ICL (no adaptation)", "0", seal.NONE),
                     seal.Row("base", "TTT + self-edit (w/o prior RL)", "20", seal.BASE),
                     seal.Row("seal", "SEAL (after ReST-EM)", "72.5", seal.RL),
                     seal.Row("oracle", "Oracle TTT (fixed config)", "100", seal.FIXED,
                              text=SelfEdit.from_spec(cfg.oracle).to_json()))

    def prompt_ids(self, item, tok):
        """The self-edit prompt. In "prefix" mode the answer already starts with the JSON skeleton's first key;
        the prefix is part of the parsed self-edit."""
        msgs = self_edit_prompt(self.tasks[item], self.cfg.fmt, self.lr_hint, self.epoch_hint)
        return tok.encode(tok.chat(msgs) + self.answer_prefix)

    def evaluation_seed(self, phase, item, k):
        """One TTT draw per task and run seed, whatever the self-edit and the row: the official run builds every
        self-edit's data from RandomState(0) and trains it with the Trainer's seed 42 (docs/official.md §1.3, §1.5),
        so its reward is a function of (task, configuration). With a seed per self-edit, two identical
        configurations could score 1 and 0 (24 examples are memorised, so which 24 decides: docs/arc.md)."""
        return seal.stable_seed(self.cfg.seed, item)

    def self_edit_key(self, text):
        """A self-edit is its configuration: texts that parse alike are evaluated once (seal.evaluate_phase)."""
        edit = parse_self_edit(text)[0] if text is not None else None
        return edit.to_json() if edit else text

    score_name = "solved"  # the table counts pass@2 after voting, whatever the reward

    @property
    def reward_name(self):
        return "graded: (solved + token accuracy) / 2" if self.cfg.reward == "graded" else "solved"

    def evaluate(self, m, adapter, item, text, seed):
        """Reward of one self-edit (text None: no adaptation, the in-context baseline). Every record holds the
        table's score (solved: pass@2 after voting) and the graded measures (`teacher_forced`) of the adapted model
        and, under `unadapted`, of the model before training, whichever reward the E-step ranks by."""
        cfg, task = self.cfg, self.tasks[item]
        out = {"reward": 0.0, "score": 0.0, "valid": True, "reason": ""}
        if text is not None:
            edit, reason = parse_self_edit(text)
            if edit is None:  # an unusable self-edit earns 0, as in the official run (there: epochs=0)
                return {**out, "valid": False, "reason": reason}
            out["edit"] = edit.to_dict()
            t0 = time.time()
            copies = ttt.ttt_tasks(task, edit.aug, seed=seed, max_examples=cfg.max_examples)
            examples, dropped = ttt.ttt_examples(copies, cfg.fmt, self.tok, cfg.max_len)
            out["examples"], out["data_seconds"] = len(examples), round(time.time() - t0, 3)
            if ttt.over_step_cap(len(examples), edit.epochs, cfg.batch_size, cfg.max_steps):
                return {**out, "valid": False, "reason": f"over the step cap ({edit.epochs} epochs x "
                                                           f"{len(examples)} examples > {cfg.max_steps} steps)"}
            out["unadapted"] = self.teacher_forced(m, task)  # the adapter is still zero: the E-step's bar
            res = lora.train(m, examples, lr=edit.lr, epochs=edit.epochs, batch_size=cfg.batch_size,
                             loss_on="completion" if edit.loss == "output" else "all", warmup=cfg.warmup,
                             schedule="cosine", seed=seed, adapter=adapter, max_len=cfg.max_len)
            out["train"] = {"steps": res.steps, "tokens": res.tokens, "seconds": round(res.seconds, 2),
                            "tok_s": round(res.tokens_per_s), **res.loss_ends()}
            if res.failed:
                return {**out, "valid": False, "reason": f"training failed: {res.failed}"}
        t0 = time.time()
        out.update(self.teacher_forced(m, task))
        attempts, skipped = zip(*[self.answer(m, task, ti) for ti in range(len(task.test))])
        out["attempts"] = [[g.tolist() for g in a] for a in attempts]
        if sum(skipped):
            out["queries_too_long"] = sum(skipped)
        out["eval_seconds"] = round(time.time() - t0, 2)
        truths = [o for _, o in task.test]
        out["cells"] = ttt.cells_right(attempts, truths)
        out["score"] = float(ttt.solved(attempts, truths))
        out["reward"] = (out["score"] + out["token_acc"]) / 2 if cfg.reward == "graded" else out["score"]
        return out

    def queries(self, task, test_idx):
        """The evaluation's views of one test input (leave-one-out contexts and geometric transforms) and their
        prompts, less those whose prompt + answer would not fit in max_len (the official run drops them too)."""
        cfg, tok = self.cfg, self.tok
        queries = ttt.eval_queries(task, test_idx, seed=seal.stable_seed(cfg.seed, task.id, test_idx))
        prompts = [tok.encode(tok.chat(ttt.task_messages(q.demos, q.query_in, cfg.fmt))) for q in queries]
        # room for the answer: the longest grid text of the task, with slack for a grid that grows
        grids = [g for pair in task.train for g in pair] + [task.test[test_idx][0]]
        budget = int(1.5 * max(len(tok.encode(ttt.answer_text(g, cfg.fmt))) for g in grids)) + 8
        fits = [i for i, p in enumerate(prompts) if len(p) + budget <= cfg.max_len]
        return [queries[i] for i in fits], [prompts[i] for i in fits], budget, len(queries) - len(fits)

    def answer(self, m, task, test_idx):
        """Greedy answers to the views of one test input, mapped back and voted to 2 attempts. Returns (attempts,
        number of views skipped because prompt + answer would not fit in max_len)."""
        queries, prompts, budget, skipped = self.queries(task, test_idx)
        texts = sampling.generate(m, self.tok, prompts, max_new_tokens=budget, stop=(ttt.FOOTER,),
                                  batch_size=self.cfg.eval_batch) if prompts else []
        outputs = []
        for q, t in zip(queries, texts):
            g = ttt.parse_answer(t, self.cfg.fmt)
            outputs.append((q.invert(g) if g is not None else None, q.group_name))
        return ttt.vote(outputs), skipped

    def teacher_forced(self, m, task) -> dict:
        """The graded reward's measure: each test input's true output, mapped into every view the evaluation
        answers and written as the answer is (grid text and footer), teacher-forced after that view's prompt, in one
        forward pass. token_acc: the share of the answer's tokens that the argmax predicts, averaged over views
        (1.0: greedy decoding writes the true grid in every view); loglik: the mean log-likelihood per token.
        Unlike pass@2 it moves with every self-edit, solved or not (docs/arc.md "The graded reward")."""
        examples = []
        for ti, (_, truth) in enumerate(task.test):
            queries, prompts, _, _ = self.queries(task, ti)
            examples += [(p, self.tok.encode(ttt.answer_text(ttt.transform(q.group_name, truth), self.cfg.fmt)))
                         for q, p in zip(queries, prompts)]
        if not examples:
            return {"token_acc": 0.0, "loglik": -math.inf}
        scores = lora.completion_scores(m, examples)
        mean = lambda xs: sum(xs) / len(xs)
        return {"token_acc": mean([s["right"] / s["tokens"] for s in scores]),
                "loglik": mean([s["loglik"] / s["tokens"] for s in scores])}

    def select(self, records):
        """The E-step. reward=solved: every solved self-edit (the official filter). reward=graded: each task's best
        self-edit by (solved, token accuracy, log-likelihood), kept only where it beats the model before training
        on the same measure (so no task teaches a self-edit that made things worse) and only where the task's
        samples differ (a task whose samples all score alike has nothing to teach)."""
        if self.cfg.reward == "solved":
            return seal.keep_rewarded(records)
        return seal.best_per_item(records, score=graded_key, bar=lambda r: graded_key(r.get("unadapted", {})),
                                  skip_ties=True)

    def choices(self, records):
        """What the parsed self-edits chose, counted per setting: the policy shift ReST-EM should produce."""
        out = {"loss": {}, "learning_rate": {}, "epochs": {}, "augmentations_on": {}}
        for r in records:
            if "edit" not in r:
                continue
            t, d = r["edit"]["training"], r["edit"]["data_generation"]
            for key, value in (("loss", t["strategy"].removeprefix("train_using_")),
                               ("learning_rate", f"{t['learning_rate']:g}"), ("epochs", str(t["num_train_epochs"])),
                               ("augmentations_on", str(sum(d.values())))):
                out[key][value] = out[key].get(value, 0) + 1
        return out

    def metrics(self, records):
        """The graded measures' means beside the table's count: the adapted model's token accuracy, log-likelihood
        and share of cells right, and the unadapted model's token accuracy (the bar a kept self-edit must beat)."""
        rated = [r for r in records if "token_acc" in r]
        if not rated:
            return {}
        mean = lambda f: sum(map(f, rated)) / len(rated)
        out = {"token_acc": mean(lambda r: r["token_acc"]), "loglik": mean(lambda r: r["loglik"]),
               "cells": mean(lambda r: r["cells"])}
        before = [r["unadapted"]["token_acc"] for r in rated if "unadapted" in r]
        return out | ({"unadapted_token_acc": sum(before) / len(before)} if before else {})


def graded_key(r) -> tuple:
    """What the graded E-step ranks by: solved first, then token accuracy, then log-likelihood. A record without
    the measures (an invalid self-edit) ranks below every measured one; an unadapted measure has no decoded
    answer and counts as unsolved."""
    if "token_acc" not in r:
        return (-1.0, 0.0, -math.inf)
    return (r.get("score", 0.0), r["token_acc"], r["loglik"])


# -----------------------------------------------------------------------------
# Split-making: the paper kept tasks that TTT under an oracle configuration solves for its 1B model
# (docs/official.md §1.1). `filter` does the same for any model and candidate list, and prints per-config results.


@dataclass
class FilterConfig(ArcConfig):
    ids: str = ""                   # candidate task ids; empty: every ARC-AGI-1 task with grids <= max_side
    max_side: int = 6
    skip: str = ""
    configs: str = "basic+size+chain+repeat:output:3e-3:2,basic+size+chain+repeat:all:1e-3:1"  # SelfEdit specs
    seeds: str = "0"                # run seeds: seed s draws the TTT data and views `run --seed=s` draws


def filter_tasks(argv):
    """Print, per candidate task and TTT configuration, k/n solved over the seeds and the attempts."""
    cfg = settings.parse_overrides(FilterConfig(), argv)
    edits = [SelfEdit.from_spec(c) for c in cfg.configs.split(",")]
    seeds = [int(s) for s in cfg.seeds.split(",")]
    if cfg.ids:
        ids = cfg.ids.split(",")
    else:  # smallest grids first: they are the cheapest to train on and to answer
        pool = ttt.load_tasks(list(ttt._arc1()))
        side = {i: max(max(g.shape) for p in t.train + t.test for g in p) for i, t in pool.items()}
        ids = sorted((i for i in pool if side[i] <= cfg.max_side), key=lambda i: side[i])
    ids = [i for i in ids if i not in cfg.skip.split(",")]
    learner = seal.Learner(cfg, cfg.model)
    split = _write_split(ids)
    # a domain per run seed, so that seed s scores a configuration on exactly the draw (TTT data, training order,
    # answer views) that `run --seed=s` gives every self-edit of that task: the filter predicts the run's reward
    doms = {s: Arc(replace(cfg, split=split, seed=s), learner.tok) for s in seeds}
    dom = doms[seeds[0]]
    flat = lambda g: "/".join("".join(map(str, row)) for row in g)
    said = lambda r: " or ".join(flat(a) for a in r["attempts"][0]) if "attempts" in r else r["reason"]
    print(f"{len(ids)} candidate tasks; configs {cfg.configs.split(',')}; seeds {seeds}", flush=True)
    for i in ids:  # a line per configuration as it finishes: at 6 epochs one takes minutes on a CPU
        tests = dom.tasks[i].test  # solved means every test input answered; the first is shown
        more = f", and {len(tests) - 1} more test input(s)" if len(tests) > 1 else ""
        print(f"{i} (truth {flat(tests[0][1].tolist())}{more}):", flush=True)
        for spec, edit in zip(cfg.configs.split(","), edits):
            t0 = time.time()
            rs = [learner.evaluate(d, i, edit.to_json(), seed=d.evaluation_seed(None, i, 0)) for d in doms.values()]
            if spec == cfg.configs.split(",")[0] and "unadapted" in rs[0]:
                print("  unadapted: token_acc " + "; ".join(f"{r['unadapted']['token_acc']:.3f}" for r in rs)
                      + ", loglik " + "; ".join(f"{r['unadapted']['loglik']:.3f}" for r in rs), flush=True)
            per_seed = lambda key, f: "; ".join(f.format(r[key]) if key in r else "-" for r in rs)
            loss = "; ".join(f"{r['train']['loss_last']:.4g}" if "train" in r else "-" for r in rs)
            print(f"  {spec}={sum(r['score'] == 1 for r in rs)}/{len(rs)} ({time.time() - t0:.0f}s; token_acc "
                  f"{per_seed('token_acc', '{:.3f}')}, loglik {per_seed('loglik', '{:.3f}')}, cells "
                  f"{per_seed('cells', '{:.2f}')}; said {'; '.join(said(r) for r in rs)}; last loss {loss})",
                  flush=True)


def _write_split(ids):
    """The candidates as a split file, so the domain is built through its constructor like a run's."""
    fd, path = tempfile.mkstemp(suffix=".json", prefix="arc-filter-")
    with os.fdopen(fd, "w") as f:
        json.dump({"rl": [], "eval": ids}, f)
    return path


def print_policy(argv):
    """Print a model's schema-mode self-edit policy on a split: per task and field, each option's probability
    at the E-step's temperature (--rl_temperature, else --se_temperature), along the most likely self-edit (a
    field's options depend on the choices before it), and how likely a sample is to be that self-edit at the
    evaluation's and at the E-step's temperature. --model=runs/arc-tiny/policy-round1 shows the policy after ReST-EM."""
    cfg = settings.parse_overrides(ArcConfig(), argv)
    temp = cfg.rl_temperature or cfg.se_temperature
    if cfg.se_mode != "schema" or cfg.se_temperature <= 0 or temp <= 0:
        raise SystemExit("policy: needs --se_mode=schema and temperatures > 0")
    learner = seal.Learner(cfg, cfg.model)
    dom = Arc(cfg, learner.tok)
    fields = [(key.replace("use_", "").replace("_augmentations", ""),
               [o.strip('"').replace("train_using_", "") for o in options])
              for (_, key, _, _), (_, options) in zip(FIELDS, dom.template)]
    print(f"{cfg.model}: option probabilities at temperature {temp:g}; p(top) is the chance that one sample is the "
          f"most likely self-edit at {cfg.se_temperature:g} and at {temp:g}", flush=True)
    for item in dom.rl_items + dom.eval_items:
        trace = []
        sampling.sample_template(learner.policy(), learner.tok, dom.prompt_ids(item, learner.tok), dom.template, n=1,
                             temperature=0, trace=trace)
        at = lambda t: [torch.softmax(torch.tensor(lp) / t, -1) for lp in trace]
        top = lambda t: math.prod(p.max().item() for p in at(t))
        print(f"{item} p(top) {top(cfg.se_temperature):.3g} / {top(temp):.3g}: " + "; ".join(
            f"{name} " + " ".join(f"{o}={p:.2f}" for o, p in zip(options, ps.tolist()))
            for (name, options), ps in zip(fields, at(temp))), flush=True)


def main(argv):
    settings.dispatch(argv, {"run": lambda a: seal.run(settings.parse_overrides(ArcConfig(), a), Arc),
                             "filter": filter_tasks, "policy": print_policy}, __doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
