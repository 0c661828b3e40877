"""
Knowledge incorporation as a SEAL domain (paper section 4.1, Table 2): the model reads a passage and writes a
self-edit (implications of the passage, or rewrites, or questions and answers); a LoRA fine-tune on those lines
and the passage puts them into the weights; the adapted model then answers questions about the passage
*without seeing it*. Its accuracy is the table's score; the reward that ReST-EM ranks each passage's self-edits by is
that accuracy, or another signal (--reward); it keeps each passage's best self-edit and clones it.

    python -m domains.knowledge run                      # what `bash train.sh knowledge` calls (Table 2's rows)

The studies around it (which inner loop, which prompt, how reliable a reward, forgetting, SQuAD's selection) are
commands of domains/knowledge_studies.py. Data: a JSON list of {"title", "context", "questions": [{"question",
"answer"}]} (the official format). The default is data/knowledge/: passages about fictional people, places and
things, so that no model knows an answer beforehand and every gain is knowledge the inner loop put into the weights.
"""
import sys
from dataclasses import dataclass

import torch

import lora
import sampling
import seal
import settings
from domains.knowledge_text import (CONSTRAINED, CONTROLS, DATA, GRADERS, PROMPTS, QA_MARKS, SELF_QA_START,
                                    SEQUENCES, answer_coverage, distinct_ngrams, judge_says_yes, load_passages,
                                    qa_pair, question_prompt, self_edit_lines, self_edit_prompt, shared_ngrams,
                                    training_texts, training_units)

ALL_PROJ = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@dataclass
class KnowledgeConfig(seal.RunConfig):
    """The official knowledge run's settings (docs/official.md §2), Qwen2.5-7B base; the CPU preset is in train.sh."""
    model: str = "Qwen/Qwen2.5-7B"
    out: str = "runs/knowledge"
    eval_data: str = str(DATA / "fictional-eval.json")
    rl_data: str = str(DATA / "fictional-rl.json")
    n_eval: int = 0                 # evaluation passages: the first n of eval_data (0: all; the paper: 200)
    n_rl: int = 0                   # RL passages per round, round r takes the r-th batch of rl_data (0: the file
                                    # split evenly over the rounds; the paper: 50)
    max_eval: int = 0               # a cap, not a count (the CPU preset's): at most n evaluation passages, all of
                                    # a smaller file (0: no cap; an explicit --n_eval wins)
    max_rl: int = 0                 # a cap on the RL passages per round, likewise
    rounds: int = 2
    rl_samples: int = 5             # self-edits per RL passage; the best one is kept
    eval_samples: int = 1
    se_temperature: float = 1.0
    se_top_p: float = 0.95
    se_max_tokens: int = 8192
    prompt: str = "implications"    # implications | implications-long | rewrite | self-qa | qa-lines (ours: the
                                    # "Question:"/"Answer:" markers forced, every word between them the model's)
                                    # | rewrite-qa (ours: free rewrite lines, then qa-lines' forced pairs)
    qa_pairs: int = 5               # --prompt=qa-lines, rewrite-qa: question-answer lines per self-edit
    chat: bool = False              # the chat format (instruct models); the paper's base model takes plain text
    frame: str = "plain"            # how a self-edit line is trained: plain ("{title}\n{line}", official) | qa (a
                                    # line that is a question and its answer is trained as the question the
                                    # evaluation asks, answered; other lines stay plain): docs/knowledge.md
    sequences: str = "lines"        # what one inner-loop sequence is: lines (official: a self-edit line; the
                                    # passage whole) | sentences (every text, the passage too, cut into sentences,
                                    # so rows differ only in what they say; a question-answer line stays whole)
    reward: str = "accuracy"        # what selects self-edits: accuracy (greedy answers, --grader) | loglik (the
                                    # gold answers' mean log-likelihood per token after the inner loop, closed book)
                                    # | sampled (--grader's accuracy over --answer_samples answers sampled at T=1)
    answer_samples: int = 0         # answers sampled per question after each inner loop (0: none; sampled needs some)
    # inner loop (TTT_server): LoRA r32 alpha64 on q, v; lr 1e-3, 10 epochs, batch 1, linear decay
    inner_lr: float = 1e-3
    inner_epochs: int = 10
    inner_batch: int = 1
    eval_times: int = 3             # inner-loop runs per self-edit; the reward is their mean accuracy
    # answering and grading
    answer_tokens: int = 64
    grader: str = "lenient"         # what the reward counts: exact | f1 | lenient | judge (see GRADERS)
    judge: str = ""                 # a local model asked yes/no, as the paper asked GPT-4.1 (needed by grader=judge)
    # M-step (train_SFT): LoRA r64 alpha128 on all 7 projections, lr 3e-4, 2 epochs, batch 1 x GA 5 x 2 GPUs
    sft_rank: int = 64
    sft_alpha: float = 128.0
    sft_targets: str = ALL_PROJ
    sft_lr: float = 3e-4
    sft_epochs: int = 2
    sft_batch: int = 10
    sft_target_loss: float = 0.0    # stop the M-step after the first epoch whose mean loss is at or below this, so
                                    # rounds and seeds end equally fit (issue 37; 0: off, the official fixed
                                    # --sft_epochs, which is the most epochs when it is on)
    # continued pretraining (the cpt row): every evaluation passage's self-edits in one adapter (v1) or full FT (v2)
    cpt_mode: str = "lora"          # lora | full
    cpt_lr: float = 1e-3
    cpt_epochs: int = 3
    cpt_batch: int = 8              # bs 4 x GA 2
    max_len: int = 2048             # the official inner loop's sequence length
    n_forget: int = 8               # passages in the forgetting sequence (official: 8)


# -----------------------------------------------------------------------------
# --grader=judge: a local model as the judge (the data, prompts and other graders are in domains/knowledge_text.py)


class Judge:
    """A local model asked yes/no whether the answer conveys the gold answer without contradicting it, as the
    paper asked GPT-4.1. Loaded once; greedy, a few tokens."""

    def __init__(self, path, device, dtype):
        import checkpoint
        self.m, self.tok = checkpoint.load(path, device=device, dtype=dtype)

    def __call__(self, questions, preds, golds):
        prompts = []
        for q, p, g in zip(questions, preds, golds):
            msg = (f"Question: {q}\nReference answer: {g}\nStudent answer: {p}\nDoes the student answer convey the "
                   f"reference answer without contradicting it? Reply yes or no.")
            prompts.append(self.tok.chat([{"role": "user", "content": msg}]))
        replies = sampling.generate(self.m, self.tok, prompts, max_new_tokens=4)
        return [float(bool(p.strip()) and judge_says_yes(r)) for p, r in zip(preds, replies)]


# -----------------------------------------------------------------------------
# The domain


class Knowledge(seal.Domain):
    """Items are passages: "e003" is the 4th evaluation passage, "r051" the 52nd RL passage."""
    rows = (seal.Row("base", "Base model (no adaptation)", "32.7", seal.NONE),
            seal.Row("passage", "Train on passage", "33.5", seal.FIXED, text=""),
            seal.Row("sentences", "Control: passage + its own sentences", "-", seal.CONTROL),
            seal.Row("gold_qa", "Control: passage + gold Q/A (sees the test)", "-", seal.CONTROL),
            seal.Row("self_edit", "Passage + self-edits (base policy)", "39.7", seal.BASE),
            seal.Row("cpt", "CPT: all passages' self-edits, one adapter", "41.0 (v2 50.6)", seal.POOLED),
            seal.Row("teacher", "Passage + teacher's self-edits", "46.3 (GPT-4.1)", seal.TEACHER),
            seal.Row("seal_r1", "SEAL, ReST-EM round 1", "42.7", seal.RL, after_round=1),
            seal.Row("seal", "SEAL, after the last round (--rounds)", "47.0 (round 2)", seal.RL))

    def __init__(self, cfg: KnowledgeConfig, tok):
        super().__init__(cfg, tok)
        for name, options in (("grader", (*GRADERS, "judge")), ("cpt_mode", ("lora", "full")), ("prompt", PROMPTS),
                              ("frame", ("plain", "qa")), ("sequences", SEQUENCES),
                              ("reward", ("accuracy", "loglik", "sampled"))):
            settings.check_choice(name, getattr(cfg, name), options)
        if cfg.grader == "judge" and not cfg.judge:
            raise SystemExit("--grader=judge needs --judge=MODEL (a local model asked yes/no)")
        if cfg.reward == "sampled" and cfg.answer_samples < 1:
            raise SystemExit("--reward=sampled needs --answer_samples >= 1")
        if cfg.answer_samples and cfg.grader == "judge":  # N sampled answers per question would need N judge calls
            raise SystemExit("--answer_samples grades with exact, f1 or lenient, not --grader=judge")
        ev = load_passages(cfg.eval_data, cfg.n_eval or None, "eval_data")[:cfg.n_eval or cfg.max_eval or None]
        rl = load_passages(cfg.rl_data, cfg.n_rl * cfg.rounds or None, "rl_data")
        self.n_rl = cfg.n_rl or min(len(rl) // max(1, cfg.rounds), cfg.max_rl or len(rl))
        self.passages = {f"e{i:03d}": p for i, p in enumerate(ev)} | {f"r{i:03d}": p for i, p in enumerate(rl)}
        self.eval_items = [f"e{i:03d}" for i in range(len(ev))]
        self.rl_items = [f"r{i:03d}" for i in range(self.n_rl * cfg.rounds)]
        overlap = {p["context"] for p in ev} & {p["context"] for p in rl}
        if overlap:
            raise SystemExit(f"{len(overlap)} passage(s) are in both eval_data and rl_data: RL must not see them")
        if cfg.prompt in CONSTRAINED and cfg.qa_pairs < 1:
            raise SystemExit(f"--prompt={cfg.prompt} needs --qa_pairs >= 1")
        self.answer_prefix = SELF_QA_START if cfg.prompt == "self-qa" else ""
        self.judge = Judge(cfg.judge, *settings.device_and_dtype(cfg)) if cfg.judge else None

    @property
    def score_name(self):
        return f"greedy {self.cfg.grader}"  # the table's number: one greedy answer per question, graded

    @property
    def reward_name(self):
        return self.score_name if self.cfg.reward == "accuracy" else self.cfg.reward

    def select(self, records):
        """The official top-1 of k per passage by the reward: greedy accuracy (official), the gold answers'
        log-likelihood or the sampled accuracy (--reward); the table counts greedy accuracy either way."""
        return seal.best_per_item(records)

    def control_text(self, key, item):
        """The ceiling rows' self-edits (controls, like ARC's oracle): CONTROLS[key] of the passage."""
        return CONTROLS[key](self.passages[item])

    def rl_items_for_round(self, r):
        n = self.n_rl
        return self.rl_items[(r - 1) * n:r * n]  # each round its own batch of passages (official)

    def _text(self, tok, ask, header, prefix=""):
        if self.cfg.chat:
            return tok.chat([{"role": "user", "content": ask}]) + prefix
        return f"{ask}\n\n{header}\n{prefix}"

    def prompt_ids(self, item, tok):
        return tok.encode(self._text(tok, *self_edit_prompt(self.passages[item], self.cfg.prompt), self.answer_prefix))

    def sample(self, m, tok, prompts, n, temperature, seeds):
        """--prompt=qa-lines, a constrained self-QA (as ARC's schema mode forces its JSON keys): --qa_pairs lines,
        each "Question:", the model's question up to its "?", "? Answer:", the model's answer up to the line's end
        (QA_MARKS). SmolLM2-135M's free self-QA rarely parsed as pairs (docs/knowledge.md); here every line does
        (a pair whose question or answer came out empty is left out), so --frame=qa trains each line as the
        evaluation's question, answered. --prompt=rewrite-qa: first the model's own rewrite lines, free, in half
        of --se_max_tokens (up to where it starts a question itself), then the same forced pairs in the other half.
        Other prompts: free text (seal.Domain.sample)."""
        if self.cfg.prompt not in CONSTRAINED:
            return super().sample(m, tok, prompts, n, temperature, seeds)
        ask, then, end = QA_MARKS
        rows = [(p, s, k) for p, s in zip(prompts, seeds) for k in range(n)]  # one row per sample
        pairs = [[] for _ in rows]
        qa_tokens, free = self.cfg.se_max_tokens, [""] * len(rows)
        if self.cfg.prompt == "rewrite-qa":
            qa_tokens //= 2
            free = self._continue(m, tok, rows, free, ("Question",), self.cfg.se_max_tokens - qa_tokens,
                                  temperature, ("free",))
            free = [f.strip() + "\n" if f.strip() else "" for f in free]
        text = lambda kept: "".join(f"{ask}{q}{then}{a}{end}" for q, a in kept)
        budget = max(4, qa_tokens // (2 * self.cfg.qa_pairs))  # tokens per question, per answer
        for line in range(self.cfg.qa_pairs):
            heads = [f + text(kept) + ask for f, kept in zip(free, pairs)]
            questions = self._continue(m, tok, rows, heads, ("?", "\n", "---"), budget, temperature, (line, "q"))
            heads = [h + q + then for h, q in zip(heads, questions)]
            answers = self._continue(m, tok, rows, heads, ("\n", "---"), budget, temperature, (line, "a"))
            for kept, q, a in zip(pairs, questions, answers):
                if q.strip() and a.strip():
                    kept.append((q.rstrip(), a.rstrip()))
        return [tok.encode((f + text(kept)).rstrip("\n")) for f, kept in zip(free, pairs)]

    def _continue(self, m, tok, rows, heads, stop, budget, temperature, where):
        """Each row's free continuation of its prompt + head, up to the first stop string (not kept). A row's seed
        is its prompt's, its sample's and `where`, so it does not depend on the batching."""
        ids = [p + tok.encode(h) for (p, _, _), h in zip(rows, heads)]
        outs = sampling.generate_ids(m, tok, ids, budget, temperature, self.cfg.se_top_p, 1, stop,
                                     [seal.stable_seed(s, k, *where) for _, s, k in rows])
        return [sampling.cut_at_stop(tok.decode(o), stop) for o in outs]

    def sequences(self, passage, text):
        """Training examples, (empty prompt, text + end of text) with the loss on every token: each unit of the
        self-edit (a line, official, or a sentence: --sequences) after the title or, with --frame=qa, a
        question-and-answer line as the very question the evaluation asks, answered; then the passage's units."""
        texts = training_texts(passage, text, self.cfg.prompt, self.cfg.sequences)
        if self.cfg.frame == "qa":
            edit, _ = training_units(passage, text, self.cfg.prompt, self.cfg.sequences)
            pairs = [qa_pair(unit) for unit in edit]
            texts = [self._text(self.tok, *question_prompt(passage, {"question": qa[0]})) + qa[1] if qa else t
                     for qa, t in zip(pairs, texts)] + texts[len(edit):]
        return [([], self.tok.encode(t) + [self.tok.eos_id]) for t in texts]

    def answer_loglik(self, m, passage):
        """The gold answers' mean log-likelihood per token, each right after its question as the evaluation asks
        it (teacher-forced, closed book): a graded reward where accuracy moves in steps of 1/questions."""
        examples = [(self.tok.encode(self._text(self.tok, *question_prompt(passage, q))), self.tok.encode(q["answer"]))
                    for q in passage["questions"]]
        return sum(s["loglik"] / s["tokens"] for s in lora.completion_scores(m, examples)) / len(examples)

    def sampled_accuracy(self, m, passage, seed):
        """--grader's accuracy over --answer_samples answers per question sampled at temperature 1: the expected
        accuracy of the adapted model, in the form it answers in, graded finer than one greedy answer."""
        n, grade = self.cfg.answer_samples, GRADERS[self.cfg.grader]
        prompts = [self.tok.encode(self._text(self.tok, *question_prompt(passage, q))) for q in passage["questions"]]
        texts = sampling.generate(m, self.tok, prompts, max_new_tokens=self.cfg.answer_tokens, temperature=1.0, n=n,
                                  stop=("\n",), seed=seed, batch_size=max(1, self.cfg.eval_batch // n))
        golds = [q["answer"] for q in passage["questions"] for _ in range(n)]
        return sum(grade(t.strip(), g) for t, g in zip(texts, golds)) / len(golds)

    def answers(self, m, passages):
        """Greedy answers to every question of the given passages, the passages absent, in one batch each."""
        prompts, where = [], []
        for p in passages:
            for q in p["questions"]:
                prompts.append(self.tok.encode(self._text(self.tok, *question_prompt(p, q))))
                where.append((p, q))
        texts = sampling.generate(m, self.tok, prompts, max_new_tokens=self.cfg.answer_tokens, stop=("\n",),
                              batch_size=self.cfg.eval_batch)
        return [t.strip() for t in texts], where

    def grade(self, preds, where):
        """{grader: [score per question]}."""
        golds = [q["answer"] for _, q in where]
        out = {name: [fn(p, g) for p, g in zip(preds, golds)] for name, fn in GRADERS.items()}
        if self.judge is not None:
            out["judge"] = self.judge([q["question"] for _, q in where], preds, golds)
        return out

    def train(self, m, adapter, examples, seed, lr=None, epochs=None, batch=None, params=None):
        cfg = self.cfg
        return lora.train(m, examples, lr=lr or cfg.inner_lr, epochs=epochs or cfg.inner_epochs,
                          batch_size=batch or cfg.inner_batch, loss_on="all", schedule="linear", warmup=0,
                          seed=seed, adapter=None if params else adapter, params=params, max_len=cfg.max_len)

    def evaluate(self, m, adapter, item, text, seed):
        """Mean accuracy over eval_times inner-loop runs (one run without adaptation when text is None). Each run
        draws a fresh LoRA A, as the official server re-initialised its adapter on every request."""
        p = self.passages[item]
        out = {"valid": True, "reason": "", "title": p["title"]}
        runs, scores = [], {}
        examples = self.sequences(p, text) if text is not None else None  # tokenized once for all runs
        for t in range(1 if text is None else self.cfg.eval_times):
            run = {}
            if text is not None:
                adapter.reset(seed=seed + t)
                res = self.train(m, adapter, examples, seed + t)
                run.update(sequences=len(examples), steps=res.steps, **res.loss_ends(),
                           train_seconds=round(res.seconds, 2))
                if res.failed:  # a non-finite loss: this run scores 0, the run goes on
                    run["failed"] = res.failed
                    runs.append(run)
                    for name in (*GRADERS, *(["judge"] if self.judge else [])):
                        scores.setdefault(name, []).append(0.0)
                    continue
            preds, where = self.answers(m, [p])
            graded = self.grade(preds, where)
            run["answers"] = preds
            run["loglik"] = self.answer_loglik(m, p)
            if self.cfg.answer_samples:
                run["sampled"] = self.sampled_accuracy(m, p, seed + t)
            for name, s in graded.items():
                scores.setdefault(name, []).append(sum(s) / len(s))
            runs.append(run)
        out["runs"] = runs
        out["accuracy"] = {name: sum(v) / len(v) for name, v in scores.items()}
        out["score"] = out["accuracy"][self.cfg.grader]  # what the table counts
        mean = lambda xs, worst: sum(xs) / len(xs) if xs else worst  # a failed run has neither score
        out["loglik"] = mean([r["loglik"] for r in runs if "loglik" in r], float("-inf"))
        if self.cfg.answer_samples:
            out["sampled"] = mean([r["sampled"] for r in runs if "sampled" in r], 0.0)
        out["reward"] = out["score"] if self.cfg.reward == "accuracy" else out[self.cfg.reward]  # what select ranks
        if text is not None and not self_edit_lines(text, self.cfg.prompt):
            out["empty"] = True  # nothing but the passage was trained
        if any("failed" in r for r in runs):
            out["valid"], out["reason"] = False, runs[-1].get("failed") or "training failed"
        return out

    def evaluate_pooled(self, m, adapter, items, texts, seed):
        """Continued pretraining (Table 2's n-passage column): every passage's self-edit lines and the passages
        in one adapter (v1) or one full fine-tune (v2), then every question of every passage."""
        cfg = self.cfg
        examples = [e for it, t in zip(items, texts) for e in self.sequences(self.passages[it], t)]
        params, saved = None, None
        if cfg.cpt_mode == "full":  # every base weight trains; they are put back afterwards
            params = [p for n, p in m.named_parameters() if "lora_" not in n]
            saved = [p.detach().clone() for p in params]
            for p in params:
                p.requires_grad_(True)
        try:
            res = self.train(m, adapter, examples, seed, cfg.cpt_lr, cfg.cpt_epochs, cfg.cpt_batch, params)
            preds, where = self.answers(m, [self.passages[it] for it in items])
        finally:
            if saved is not None:
                with torch.no_grad():
                    for p, s in zip(params, saved):
                        p.copy_(s)
                        p.requires_grad_(False)
        graded = self.grade(preds, where)
        acc = {name: sum(s) / len(s) for name, s in graded.items()}
        return {"score": acc[cfg.grader], "accuracy": acc, "weight": len(items), "valid": not res.failed,
                "reason": res.failed or "", "sequences": len(examples), "steps": res.steps,
                "train_seconds": round(res.seconds, 2), "answers": preds}

    def metrics(self, records):
        """Every grader's mean accuracy side by side, and of the self-edits: their lines, how many gold answers they
        state, and how varied they are (distinct word bigrams, pooled; and the share of bigrams another passage's
        self-edits also hold, which rises with a shared template and not with copying one's own passage)."""
        recs = [r for r in records if "accuracy" in r]
        if not recs:
            return {}
        weights = [r["weight"] for r in recs]
        out = {name: sum(r["accuracy"][name] * w for r, w in zip(recs, weights)) / sum(weights)
               for name in recs[0]["accuracy"]}
        for name in ("loglik", "sampled"):
            got = [r[name] for r in recs if name in r]
            if got:
                out[name] = sum(got) / len(got)
        with_text = [r for r in recs if r.get("text") and r["item"] in self.passages]
        if with_text:
            out["self_edit_lines"] = sum(len(self_edit_lines(r["text"], self.cfg.prompt))
                                         for r in with_text) / len(with_text)
            out["answer_coverage"] = sum(answer_coverage(self.passages[r["item"]], r["text"])
                                         for r in with_text) / len(with_text)
            distinct = distinct_ngrams([r["text"] for r in with_text])
            if distinct is not None:
                out["distinct_2"] = distinct
                out["shared_2"] = shared_ngrams([(r["item"], r["text"]) for r in with_text])
        return out


def main(argv):
    settings.dispatch(argv, {"run": lambda a: seal.run(settings.parse_overrides(KnowledgeConfig(), a), Knowledge)},
                      __doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
