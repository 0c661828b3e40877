"""
ARC as a SEAL domain (paper section 4.2): what seal.py's ReST-EM loop asks of a domain.

    prompt_ids(item)             the self-edit prompt: the task's demonstrations, never its test input
    evaluate(m, item, text, seed) the reward: parse the self-edit, build its TTT data, LoRA-train (lora.py),
                                 answer the held-out test input(s) under leave-one-out views, vote, pass@2
    select(records)              the E-step filter: every self-edit whose adapted model solved the task
    release(m)                   drop the inner-loop adapter before the M-step changes the weights
    choices(records)             what the self-edits chose (loss, learning rate, ...), counted, for the report

One LoRA adapter (r=128, alpha=16 on q, v, gate, up, down) is injected once and reset in place before every
self-edit, as the official run does: no re-wrapping, no disk.

    python arc_domain.py filter --max_side=6 --configs=all:1e-3:1   # which tasks a TTT config solves (split-making)
    python arc_domain.py policy --split=tiny --se_epoch_options=1,2,4,6   # what a model's self-edits would choose
"""
import json
import re
import sys
import time
from pathlib import Path

import torch

import arc
import lora
import seal

DATA = Path(__file__).parent / "data" / "arc"


def self_edit_template(lr_options, epoch_options):
    """The self-edit schema with holes, for seal.sample_template. SmolLM2-135M wrote 0 valid self-edits of 8
    freely, even with the skeleton's first key given (it invents keys, writes 0.1 for booleans): a self-edit
    that never parses earns no reward and ReST-EM has nothing to learn from. Forcing the keys keeps the
    choices, the part SEAL learns, with the model."""
    b = ["true", "false"]
    return [('{"data_generation": {"use_basic_augmentations": ', b), (', "use_size_augmentations": ', b),
            (', "use_chain_augmentations": ', b), (', "use_repeat_augmentations": ', b),
            ('}, "training": {"strategy": ', ['"train_using_all_tokens"', '"train_using_output_tokens"']),
            (', "learning_rate": ', list(lr_options)), (', "num_train_epochs": ', list(epoch_options)),
            ("}}", None)]


class ArcDomain:
    # the rows of the paper's Table 1: (row key, method, paper success rate %)
    rows = [("icl", "ICL (no adaptation)", "0"), ("base", "TTT + self-edit (w/o prior RL)", "20"),
            ("seal", "SEAL (after ReST-EM)", "72.5"), ("oracle", "Oracle TTT (fixed config)", "100")]

    def __init__(self, cfg, tok):
        self.cfg, self.tok = cfg, tok
        path = Path(cfg.split) if cfg.split.endswith(".json") else DATA / f"{cfg.split}.json"
        if not path.exists():
            raise SystemExit(f"no ARC split {cfg.split!r}: expected {path}")
        split = json.loads(path.read_text())
        self.rl_items = split["rl"]
        self.eval_items = split.get("eval_scored", split["eval"])  # paper: the 8 scored tasks, so k/40
        self.tasks = arc.load_tasks(self.rl_items + self.eval_items)
        if cfg.se_mode not in ("free", "prefix", "schema"):
            raise SystemExit(f"--se_mode={cfg.se_mode!r}: expected free, prefix or schema")
        self.answer_prefix = arc.SKELETON_PREFIX if cfg.se_mode == "prefix" else ""
        lrs, epochs = cfg.se_lr_options.split(","), cfg.se_epoch_options.split(",")
        self.template = self_edit_template(lrs, epochs) if cfg.se_mode == "schema" else None
        # the prompt must offer what can be chosen: in schema mode, exactly the values of the template
        # (a first tiny run whose prompt said "between 1e-5 and 1e-3" sampled 1e-3 every time of 28)
        self.lr_hint = ("one of " + ", ".join(lrs)) if self.template else cfg.lr_hint
        self.epoch_hint = ("one of " + ", ".join(epochs)) if self.template else ""
        self.eot_id = tok.eos_id
        self.adapter = None

    def prompt_ids(self, item):
        """The self-edit prompt. In "prefix" mode the answer already starts with the JSON skeleton's first key;
        the prefix is part of the parsed self-edit."""
        msgs = arc.self_edit_prompt(self.tasks[item], self.cfg.fmt, self.lr_hint, self.epoch_hint)
        return self.tok.encode(self.tok.chat(msgs) + self.answer_prefix)

    def release(self, m):
        if self.adapter is not None:
            self.adapter.remove()
            self.adapter = None

    def evaluate(self, m, item, text, seed):
        """Reward of one self-edit (text None: no adaptation, the in-context baseline)."""
        cfg, task = self.cfg, self.tasks[item]
        if self.adapter is None:
            self.adapter = lora.inject(m, r=cfg.lora_rank, alpha=cfg.lora_alpha,
                                       targets=cfg.lora_targets.split(","), seed=cfg.seed)
        self.adapter.reset()  # B = 0: the model is exactly the base model until trained
        out = {"reward": 0.0, "valid": True, "reason": ""}
        if text is not None:
            edit, reason = arc.parse_self_edit(text)
            if edit is None:  # an unusable self-edit earns 0, as in the official run (there: epochs=0)
                return {**out, "valid": False, "reason": reason}
            out["edit"] = edit.to_dict()
            copies = arc.ttt_tasks(task, edit.aug, seed=seed, max_examples=cfg.max_examples)
            examples, dropped = arc.ttt_examples(copies, cfg.fmt, self.tok, cfg.max_len)
            out["examples"] = len(examples)
            if arc.over_step_cap(len(examples), edit.epochs, cfg.batch_size, cfg.max_steps):
                return {**out, "valid": False, "reason": f"over the step cap ({edit.epochs} epochs x "
                                                           f"{len(examples)} examples > {cfg.max_steps} steps)"}
            res = lora.train(m, examples, lr=edit.lr, epochs=edit.epochs, batch_size=cfg.batch_size,
                             loss_on="completion" if edit.loss == "output" else "all", warmup=cfg.warmup,
                             schedule="cosine", seed=seed, adapter=self.adapter, max_len=cfg.max_len)
            out["train"] = {"steps": res.steps, "tokens": res.tokens, "seconds": round(res.seconds, 2),
                            "tok_s": round(res.tokens_per_s), "loss_first": res.losses[0] if res.losses else None,
                            "loss_last": res.losses[-1] if res.losses else None}
            if res.failed:
                return {**out, "valid": False, "reason": f"training failed: {res.failed}"}
        t0 = time.time()
        attempts = [self.answer(m, task, ti) for ti in range(len(task.test))]
        out["attempts"] = [[g.tolist() for g in a] for a in attempts]
        out["eval_seconds"] = round(time.time() - t0, 2)
        out["reward"] = float(arc.solved(attempts, [o for _, o in task.test]))
        return out

    def answer(self, m, task, test_idx):
        """Greedy answers to the leave-one-out views of one test input, mapped back and voted to 2 attempts."""
        cfg, tok = self.cfg, self.tok
        queries = arc.eval_queries(task, test_idx, seed=seal.stable_seed(cfg.seed, task.id, test_idx))
        prompts = [tok.encode(tok.chat(arc.task_messages(q.demos, q.query_in, cfg.fmt))) for q in queries]
        # room for the answer: the longest grid text of the task, with slack for a grid that grows
        grids = [g for pair in task.train for g in pair] + [task.test[test_idx][0]]
        longest = max(len(tok.encode(arc.answer_text(g, cfg.fmt))) for g in grids)
        budget = min(int(1.5 * longest) + 8, cfg.max_len - max(map(len, prompts)))
        texts = seal.generate(m, tok, prompts, max_new_tokens=budget, stop=(arc.FOOTER,), batch_size=cfg.eval_batch)
        outputs = []
        for q, t in zip(queries, texts):
            g = arc.parse_answer(t, cfg.fmt)
            outputs.append((q.invert(g) if g is not None else None, q.group_name))
        return arc.vote(outputs)

    def select(self, records):
        return [r for r in records if r["reward"] == 1]

    @staticmethod
    def choices(records):
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


# -----------------------------------------------------------------------------
# Split-making: the paper kept tasks that TTT under an oracle configuration solves for its 1B model
# (seal-reference 1.1). `filter` does the same for any model and candidate list, and prints per-config results.


def filter_tasks(argv):
    """Print, per candidate task and TTT configuration, solved or not and the two attempts against the truth.
    --configs=loss:lr:epochs,... (loss all|output), --aug=basic,size,chain,repeat (the switches turned on),
    --ids=... or --max_side=N (every ARC-AGI-1 task whose grids are all at most N x N), --skip=ids,
    --seeds=0,1,... (each seed draws other TTT examples, as each self-edit of a run does: k/n solved)."""
    import model as model_lib
    mine = ("--ids=", "--configs=", "--max_side=", "--aug=", "--skip=", "--seeds=")
    cfg = seal.parse_overrides(seal.RunConfig(fmt="compact", max_examples=24, warmup=2),
                               [a for a in argv if not a.startswith(mine)])
    opts = dict(a[2:].split("=", 1) for a in argv if a.startswith(mine))
    configs = [c.split(":") for c in opts.get("configs", "output:3e-3:2,all:1e-3:1").split(",")]
    if any(len(c) != 3 or c[0] not in ("all", "output") for c in configs):
        raise SystemExit(f"--configs={opts['configs']!r}: expected loss:lr:epochs with loss all or output")
    aug = opts.get("aug", "basic,size,chain,repeat").split(",")
    seeds = [int(s) for s in opts.get("seeds", str(cfg.seed)).split(",")]
    if "ids" in opts:
        ids = opts["ids"].split(",")
    else:  # smallest grids first: they are the cheapest to train on and to answer
        max_side = int(opts.get("max_side", 6))
        pool = arc.load_tasks(list(arc._arc1()))
        side = {i: max(max(g.shape) for p in t.train + t.test for g in p) for i, t in pool.items()}
        ids = sorted((i for i in pool if side[i] <= max_side), key=lambda i: side[i])
    ids = [i for i in ids if i not in opts.get("skip", "").split(",")]
    m, tok = model_lib.load(cfg.model)
    dom = ArcDomain.__new__(ArcDomain)
    dom.cfg, dom.tok, dom.adapter, dom.eot_id, dom.answer_prefix, dom.template = cfg, tok, None, tok.eos_id, "", None
    dom.tasks = arc.load_tasks(ids)
    flat = lambda g: "/".join("".join(map(str, row)) for row in g)
    said = lambda r: " or ".join(flat(a) for a in r["attempts"][0]) if "attempts" in r else r["reason"]
    print(f"{len(ids)} candidate tasks; configs {[':'.join(c) for c in configs]}; augmentations {aug}; "
          f"seeds {seeds}", flush=True)
    for i in ids:
        row = []
        for loss, lr, ep in configs:
            edit = arc.SelfEdit(*(a in aug for a in ("basic", "size", "chain", "repeat")), loss, float(lr), int(ep))
            t0 = time.time()
            rs = [dom.evaluate(m, i, edit.to_json(), seed=s) for s in seeds]
            got = "; ".join(said(r) for r in rs)
            row.append(f"{loss}:{lr}:{ep}={sum(r['reward'] == 1 for r in rs)}/{len(rs)} "
                       f"({time.time() - t0:.0f}s; said {got})")
        print(f"{i} (truth {flat(dom.tasks[i].test[0][1].tolist())}): " + "  ".join(row), flush=True)


def print_policy(argv):
    """Print a model's schema-mode self-edit policy on a split: per task and field, each option's probability
    at --se_temperature, along the most likely self-edit (a field's options depend on the choices before it).
    --model=runs/arc-tiny/policy-round1 shows the policy after ReST-EM."""
    import model as model_lib
    cfg = seal.parse_overrides(seal.RunConfig(fmt="compact", se_mode="schema"), argv)
    if cfg.se_mode != "schema" or cfg.se_temperature <= 0:
        raise SystemExit("policy: needs --se_mode=schema and --se_temperature > 0")
    m, tok = model_lib.load(cfg.model)
    dom = ArcDomain(cfg, tok)
    fields = [(re.findall(r'"(\w+)": $', fixed)[-1].replace("use_", "").replace("_augmentations", ""),
               [o.strip('"').replace("train_using_", "") for o in options])
              for fixed, options in dom.template if options]
    print(f"{cfg.model}: option probabilities at temperature {cfg.se_temperature:g}", flush=True)
    for item in dom.rl_items + dom.eval_items:
        trace = []
        seal.sample_template(m, tok, dom.prompt_ids(item), dom.template, n=1, temperature=0, trace=trace)
        probs = [torch.softmax(torch.tensor(lp) / cfg.se_temperature, -1).tolist() for lp in trace]
        print(item, "; ".join(f"{name} " + " ".join(f"{o}={p:.2f}" for o, p in zip(options, ps))
                              for (name, options), ps in zip(fields, probs)), flush=True)


if __name__ == "__main__":
    commands = {"filter": filter_tasks, "policy": print_policy}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        raise SystemExit(__doc__)
    commands[sys.argv[1]](sys.argv[2:])
