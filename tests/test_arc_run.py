"""ARC through the shared loop on a tiny random model: the run end to end, resume, the schema prompt, filter,
policy. (The loop itself, with rewards it can earn, is tested through a fake domain in test_seal.py.)"""
import json
import re
from pathlib import Path

import pytest
import torch

import lora
import checkpoint
import sampling
import run_folder
import seal
from domains import arc as arc_domain

SPLIT = {"rl": ["6150a2bd"], "eval": ["5582e5ca"]}


@pytest.fixture(scope="module")
def tiny_dir(tiny_chat_dir):
    (tiny_chat_dir / "split.json").write_text(json.dumps(SPLIT))
    return tiny_chat_dir


def config(tiny_dir, out, **kw):
    base = dict(model=str(tiny_dir), split=str(tiny_dir / "split.json"), out=str(out), fmt="compact",
                rl_samples=2, eval_samples=1, se_max_tokens=24, max_examples=4, warmup=1, sft_epochs=1,
                oracle="basic+size+chain+repeat:output:1e-4:2")
    return arc_domain.ArcConfig(**{**base, **kw})


def run(cfg):
    return seal.run(cfg, arc_domain.Arc)


def test_end_to_end_smoke(tiny_dir, tmp_path):
    res = run(config(tiny_dir, tmp_path / "run"))
    assert [r["row"] for r in res["rows"]] == ["icl", "base", "seal", "oracle"]
    assert {r["row"]: r["total"] for r in res["rows"]} == {"icl": 1, "base": 1, "seal": 1, "oracle": 1}
    recs = [json.loads(line) for line in (tmp_path / "run" / "evals.jsonl").read_text().splitlines()]
    assert sorted({r["phase"] for r in recs}) == ["base", "icl", "oracle", "rl1", "seal"]
    assert len([r for r in recs if r["phase"] == "rl1"]) == 2
    oracle = next(r for r in recs if r["phase"] == "oracle")
    assert oracle["valid"] and oracle["train"]["steps"] > 0  # the fixed config trains
    assert (tmp_path / "run" / "policy-round1" / "DONE").exists()
    assert json.loads(oracle["text"]) == arc_domain.SelfEdit.from_spec("basic+size+chain+repeat:output:1e-4:2").to_dict()
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["rows"] == res["rows"]
    (rnd,) = saved["rounds"]  # the real filter: a random model solves nothing, so nothing is kept
    assert (rnd["samples"], rnd["rewarded"], rnd["m_step"]) == (2, 0, None)


class CountingArc(arc_domain.Arc):
    """ARC, counting its evaluations and crashing at the 4th when asked (the evaluation itself is ARC's own)."""
    calls, crash = [], False

    def evaluate(self, m, adapter, item, text, seed):
        CountingArc.calls.append((item, text, seed))
        if len(CountingArc.calls) == 4 and CountingArc.crash:
            raise KeyboardInterrupt("injected failure")
        return super().evaluate(m, adapter, item, text, seed)


def test_resume_after_a_crash_repeats_nothing(tiny_dir, tmp_path):
    calls = CountingArc.calls
    calls.clear()
    CountingArc.crash = True
    try:
        with pytest.raises(KeyboardInterrupt):
            seal.run(config(tiny_dir, tmp_path / "a"), CountingArc)
    finally:
        CountingArc.crash = False
    done_before = len((tmp_path / "a" / "evals.jsonl").read_text().splitlines())
    assert done_before == 3
    calls.clear()
    resumed = seal.run(config(tiny_dir, tmp_path / "a"), CountingArc)
    assert len(calls) == 6 - done_before and len(set(calls)) == len(calls)  # nothing evaluated twice
    assert len({seed for item, _, seed in calls if item == SPLIT["eval"][0]}) == 1  # one TTT draw per task
    calls.clear()
    straight = seal.run(config(tiny_dir, tmp_path / "b"), CountingArc)
    assert len(calls) == 6
    assert resumed["rows"] == straight["rows"]
    a = [json.loads(x) for x in (tmp_path / "a" / "evals.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "b" / "evals.jsonl").read_text().splitlines()]
    strip = lambda r: {k: v for k, v in r.items() if k not in ("seconds", "eval_seconds", "data_seconds", "train")}
    key = lambda r: (r["phase"], r["item"], r["k"])
    assert sorted(map(strip, a), key=key) == sorted(map(strip, b), key=key)


def test_schema_mode_samples_only_valid_self_edits(tiny_dir, tmp_path):
    run(config(tiny_dir, tmp_path, se_mode="schema", rows="base", eval_samples=3))
    recs = [json.loads(x) for x in (tmp_path / "evals.jsonl").read_text().splitlines()]
    assert len(recs) == 3 and all(arc_domain.parse_self_edit(r["text"])[0] is not None for r in recs)
    assert all(r["valid"] or "step cap" in r["reason"] for r in recs)


def test_a_round_that_keeps_nothing_saves_no_weights(tiny_dir, tmp_path):
    cfg = config(tiny_dir, tmp_path, rows="seal", se_mode="schema")
    first = run(cfg)  # a random model solves nothing, so the E-step keeps nothing
    policy = tmp_path / "policy-round1"
    assert (policy / "DONE").read_text() == "unchanged\n" and not (policy / "model.safetensors").exists()
    (rnd,) = first["rounds"]
    assert (rnd["samples"], rnd["rewarded"], rnd["m_step"]) == (2, 0, None)
    assert run(cfg)["rows"] == first["rows"]  # and a resume goes straight through


def test_schema_prompt_offers_the_schema_values(tiny_dir):
    m, tok = checkpoint.load(str(tiny_dir))
    cfg = config(tiny_dir, "unused", se_mode="schema", se_lr_options="3e-4,1e-3,3e-3", se_epoch_options="1,3,6")
    dom = arc_domain.Arc(cfg, tok)
    text = tok.decode(dom.prompt_ids("6150a2bd", tok))
    assert "one of 3e-4, 1e-3, 3e-3" in text and "1e-5" not in text
    assert "passes over the data, one of 1, 3, 6" in text
    assert dict(dom.template)[', "num_train_epochs": '] == ["1", "3", "6"]
    free = arc_domain.Arc(config(tiny_dir, "unused"), tok)  # free mode: the official wording, no list
    assert "passes over the data\n" in tok.decode(free.prompt_ids("6150a2bd", tok))


def test_choices_count_what_parsed_self_edits_picked():
    edits = [arc_domain.SelfEdit(True, False, False, False, "all", 1e-3, 1),
             arc_domain.SelfEdit(True, True, True, True, "output", 3e-3, 2)]
    recs = [{"edit": e.to_dict(), "reward": 1.0} for e in edits] + [{"valid": False, "reason": "bad json"}]
    assert arc_domain.Arc.choices(None, recs) == {
        "loss": {"all_tokens": 1, "output_tokens": 1}, "learning_rate": {"0.001": 1, "0.003": 1},
        "epochs": {"1": 1, "2": 1}, "augmentations_on": {"1": 1, "4": 1}}


def test_filter_scores_each_config_over_seeds(tiny_dir, capsys):
    arc_domain.filter_tasks([f"--model={tiny_dir}", "--ids=5582e5ca", "--fmt=compact",
                             "--configs=basic:all:1e-3:1,basic+size+chain+repeat:output:3e-3:2",
                             "--seeds=0,1", "--max_examples=2", "--max_len=2048"])
    header, task, unadapted, first, second = capsys.readouterr().out.strip().splitlines()
    assert "seeds [0, 1]" in header
    assert task == "5582e5ca (truth 888/888/888):"  # one test input
    assert unadapted.startswith("  unadapted: token_acc ")  # the graded measures before training, once per task
    assert first.startswith("  basic:all:1e-3:1=0/2 (")  # a line per configuration, as it finishes
    assert second.startswith("  basic+size+chain+repeat:output:3e-3:2=0/2 (")
    assert "said 0; 0" in first and "said 0; 0" in second  # one answer per seed: a random model writes no valid grid
    assert "token_acc " in first and "cells 0.00; 0.00" in first  # graded measures per seed beside solved


def test_filter_seed_is_the_runs_draw(tiny_dir, capsys):
    """Filter seed s scores a configuration on the draw `run --seed=s` gives that task, so it predicts the reward."""
    spec, common = "basic+size:output:3e-3:2", dict(model=str(tiny_dir), fmt="compact", max_examples=3, max_len=2048)
    arc_domain.filter_tasks([f"--{k}={v}" for k, v in common.items()] + ["--ids=6150a2bd", "--seeds=1,2",
                                                                          f"--configs={spec}"])
    printed = capsys.readouterr().out.strip().splitlines()[-1].split("last loss ")[1].rstrip(")").split("; ")
    cfg = arc_domain.ArcConfig(**common, split=str(tiny_dir / "split.json"), seed=2)  # a run's domain, seed 2
    learner = seal.Learner(cfg, cfg.model)
    dom = arc_domain.Arc(cfg, learner.tok)
    rec = learner.evaluate(dom, "6150a2bd", arc_domain.SelfEdit.from_spec(spec).to_json(),
                           dom.evaluation_seed("rl1", "6150a2bd", 0))
    assert printed[1] == f"{rec['train']['loss_last']:.4g}"  # seed 2: the run's own draw
    assert printed[0] != printed[1]  # and seed 1 is another draw


def test_policy_prints_each_fields_option_probabilities(tiny_dir, capsys):
    tops = {}

    def policy(temperature):  # the E-step's temperature; the evaluation's stays at 0.8
        arc_domain.print_policy([f"--model={tiny_dir}", f"--split={tiny_dir / 'split.json'}", "--fmt=compact",
                                 "--se_mode=schema", "--se_epoch_options=1,2,4,6", "--se_temperature=0.8",
                                 f"--rl_temperature={temperature}"])
        header, *lines = capsys.readouterr().out.strip().splitlines()
        assert f"option probabilities at temperature {temperature:g};" in header
        out = {}
        for line in lines:
            item, top, rest = re.match(r"(\S+) p\(top\) (\S+ / \S+): (.*)", line).groups()
            tops.setdefault(item, []).append([float(x) for x in top.split(" / ")])
            fields = dict(f.split(" ", 1) for f in rest.split("; "))
            out[item] = {f: {o: float(p) for o, p in (x.split("=") for x in v.split())} for f, v in fields.items()}
        return out
    cold, hot = policy(0.5), policy(4.0)
    assert list(cold) == SPLIT["rl"] + SPLIT["eval"]
    fields = cold["6150a2bd"]
    assert list(fields) == ["basic", "size", "chain", "repeat", "strategy", "learning_rate", "num_train_epochs"]
    assert list(fields["strategy"]) == ["all_tokens", "output_tokens"]
    assert list(fields["num_train_epochs"]) == list("1246")
    for item in cold:
        for f, probs in cold[item].items():
            assert sum(probs.values()) == pytest.approx(1, abs=0.02)
            assert max(hot[item][f].values()) <= max(probs.values()) + 0.01  # a higher temperature flattens
    assert any(max(hot[i][f].values()) < max(cold[i][f].values()) - 0.01 for i in cold for f in cold[i])
    for (at_eval, at_cold), (again, at_hot) in tops.values():  # p(top): a hot E-step rarely repeats the top edit
        assert at_eval == again and at_hot < at_cold and 0 < at_hot < 1


def test_unknown_subcommand_prints_the_usage():
    import subprocess
    import sys
    res = subprocess.run([sys.executable, "-m", "domains.arc", "nope"], capture_output=True, text=True,
                         cwd=Path(arc_domain.__file__).parent.parent)
    assert res.returncode == 1 and "python -m domains.arc policy" in res.stderr


def test_views_too_long_for_max_len_are_skipped(tiny_dir):
    """A view whose prompt leaves no room for the answer is dropped (as the official run drops queries over its
    limit). Before, a prompt longer than max_len made the answer budget negative and the cache too short."""
    m, tok = checkpoint.load(str(tiny_dir))
    task = arc_domain.ttt.load_tasks(["5582e5ca"])["5582e5ca"]
    views = arc_domain.ttt.eval_queries(task, 0, seed=seal.stable_seed(0, task.id, 0))
    longest = max(len(tok.encode(tok.chat(arc_domain.ttt.task_messages(q.demos, q.query_in, "compact"))))
                  for q in views)
    for max_len, skipped in ((2048, 0), (longest + 4, len(views)), (longest - 20, len(views))):
        dom = arc_domain.Arc(config(tiny_dir, "unused", max_len=max_len), tok)
        attempts, n = dom.answer(m, task, 0)
        assert n == skipped and len(attempts) >= 1
    res = dom.evaluate(m, lora.inject(m, r=2, alpha=2), "5582e5ca", None, seed=0)  # no view fits: reward 0
    assert res["reward"] == 0 and res["queries_too_long"] == len(views)


def test_self_edits_that_parse_alike_are_one_evaluation_on_one_draw(tiny_dir, tmp_path):
    """ARC's reward is a function of (task, configuration), as the official run's: one seed per task whatever the
    row or sample, and two texts of one configuration are evaluated once, the second sharing the first's record."""
    cfg = config(tiny_dir, tmp_path)
    learner = seal.Learner(cfg, cfg.model)
    dom = CountingArc(cfg, learner.tok)
    edit = arc_domain.SelfEdit(True, False, False, False, "output", 1e-3, 1)
    spaced = json.dumps(edit.to_dict(), indent=2) + " and some words after it"
    assert dom.self_edit_key(spaced) == dom.self_edit_key(edit.to_json()) != dom.self_edit_key("{not json")
    assert dom.evaluation_seed("base", "5582e5ca", 0) == dom.evaluation_seed("seal", "5582e5ca", 3)
    assert dom.evaluation_seed("base", "5582e5ca", 0) != dom.evaluation_seed("base", "6150a2bd", 0)
    jobs = [{"item": "5582e5ca", "k": k, "text": t} for k, t in enumerate([edit.to_json(), "{not json", spaced])]
    CountingArc.calls.clear()
    recs = seal.evaluate_phase(run_folder.RunFolder(cfg), learner, dom, "base", jobs, cfg)
    assert [c[1] for c in CountingArc.calls] == [edit.to_json(), "{not json"]
    assert recs[2]["shared_with"] == 0 and recs[2]["text"] == spaced and recs[2]["train"] == recs[0]["train"]
    assert recs[2]["attempts"] == recs[0]["attempts"] and recs[2]["reward"] == recs[0]["reward"]
    assert not recs[1]["valid"] and "shared_with" not in recs[1]


def test_a_folder_from_per_self_edit_draws_does_not_resume(tmp_path):
    """Rewards drawn with one TTT draw per self-edit are of another kind than one draw per task: such a folder
    (its config.json has no ttt_draw) is refused, not mixed into."""
    cfg = arc_domain.ArcConfig(out=str(tmp_path / "old"))
    old = {k: v for k, v in cfg.fingerprint.items() if k != "ttt_draw"}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps(old))
    with pytest.raises(SystemExit, match="ttt_draw"):
        run_folder.RunFolder(cfg)
    run_folder.RunFolder(arc_domain.ArcConfig(out=str(tmp_path / "new")))  # a new folder takes the new kind
    assert json.loads((tmp_path / "new" / "config.json").read_text())["ttt_draw"] == "per task"


def test_m_step_on_pinned_records_moves_the_options_to_the_kept_configuration(tiny_dir, tmp_path):
    """ReST-EM's M-step (seal.Learner.m_step) on records that all chose one configuration makes the policy's most
    likely self-edit that configuration, on the RL task it was kept for and on the evaluation task it never saw
    (at 135M what transfers is one global configuration, docs/arc.md)."""
    cfg = config(tiny_dir, tmp_path, se_mode="schema", se_lr_options="3e-4,1e-3,3e-3", se_epoch_options="1,2,4,6",
                 sft_lr=2e-2, sft_epochs=10, sft_batch=2)
    learner = seal.Learner(cfg, cfg.model)
    dom = arc_domain.Arc(cfg, learner.tok)
    enc = lambda s: learner.tok.encode(s) if s else []

    def greedy(item):  # the most likely self-edit and, per field, the options' log-probabilities along it
        trace = []
        ids = sampling.sample_template(learner.policy(), learner.tok, dom.prompt_ids(item, learner.tok), dom.template,
                                   n=1, temperature=0, trace=trace)[0]
        return learner.tok.decode(ids), trace

    # the kept configuration: at every field the option the base policy likes least along its own path
    _, trace = greedy("6150a2bd")
    picks = [min(range(len(lp)), key=lp.__getitem__) for lp in trace]
    kept_ids, j = [], 0
    for fixed, opts in dom.template:
        kept_ids += enc(fixed)
        if opts:
            kept_ids += enc(opts[picks[j]])
            j += 1
    kept = learner.tok.decode(kept_ids)
    assert arc_domain.parse_self_edit(dom.answer_prefix + kept)[0] is not None
    before = {item: greedy(item)[0] for item in ("6150a2bd", "5582e5ca")}
    assert all(text != kept for text in before.values())

    records = [{"item": "6150a2bd", "prompt_ids": dom.prompt_ids("6150a2bd", learner.tok), "ids": kept_ids}] * 4
    learner.m_step(records, "rl1", tmp_path / "policy-round1")
    assert greedy("6150a2bd")[0] == kept  # the RL task it was kept for
    assert greedy("5582e5ca")[0] == kept  # and the evaluation task: one global setting


def test_filter_says_when_a_solve_needs_several_test_inputs(tiny_dir, capsys):
    """25ff71a9 has two test inputs: its truth line shows the first and says a solve needs the other too."""
    arc_domain.filter_tasks([f"--model={tiny_dir}", "--ids=25ff71a9", "--fmt=compact", "--configs=basic:all:1e-3:1",
                             "--seeds=0", "--max_examples=2", "--max_len=2048"])
    task = capsys.readouterr().out.strip().splitlines()[1]
    assert task.startswith("25ff71a9 (truth ") and task.endswith(", and 1 more test input(s)):")
