"""ARC's graded reward (--reward=graded, docs/arc.md "The graded reward"), its E-step, and the policy kept apart
from the model test-time training adapts (--ttt_base=base), on a tiny random model with the real tokenizer."""
import json
import math

import numpy as np
import pytest
import torch

import lora
import run_folder
import seal
from domains import arc as arc_domain
from domains import arc_ttt as ttt

TASK = "5582e5ca"  # 3x3 grids, one test input


@pytest.fixture(scope="module")
def tiny_dir(tiny_chat_dir):
    (tiny_chat_dir / "split.json").write_text(json.dumps({"rl": ["6150a2bd"], "eval": [TASK]}))
    return tiny_chat_dir


def config(tiny_dir, out="unused", **kw):
    base = dict(model=str(tiny_dir), split=str(tiny_dir / "split.json"), out=str(out), fmt="compact",
                rl_samples=2, eval_samples=1, se_max_tokens=24, max_examples=4, warmup=1, sft_epochs=1,
                reward="graded", oracle="basic+size+chain+repeat:output:1e-4:2")
    return arc_domain.ArcConfig(**{**base, **kw})


def test_completion_scores_equal_one_forward_per_example(tiny_dir):
    """The packed teacher-forced scores equal each example's own unpacked forward: the argmax hits and the summed
    log-likelihood of the completion tokens, given the prompt and the true tokens before them."""
    learner = seal.Learner(config(tiny_dir), str(tiny_dir))
    m, tok = learner.policy(), learner.tok
    examples = [(tok.encode("123\n456 ->"), tok.encode("789#")), (tok.encode("abc"), tok.encode(" def ghi")),
                ([5], [7, 9])]
    got = lora.completion_scores(m, examples)
    for (prompt, completion), s in zip(examples, got):
        seq = torch.tensor([prompt + completion])
        logp = torch.log_softmax(m(seq)[0].float(), -1)[len(prompt) - 1:-1]
        target = torch.tensor(completion)
        assert s["tokens"] == len(completion)
        assert s["right"] == int((logp.argmax(-1) == target).sum())
        assert s["loglik"] == pytest.approx(logp.gather(1, target[:, None]).sum().item(), rel=1e-4, abs=1e-4)


def test_graded_measure_rewards_the_truth_and_training_on_it(tiny_dir):
    """27a28665 answers a 1x1 grid for each of its 3 test inputs. The tiny model trained on the evaluation views
    with the true answers scores higher than untrained; per test input, token accuracy 1 holds exactly where greedy
    decoding writes the true grid (pass@2 solves it), and another answer scores below the truth where it is written."""
    cfg = config(tiny_dir, split=str(tiny_dir / "split-1x1.json"))
    (tiny_dir / "split-1x1.json").write_text(json.dumps({"rl": [], "eval": ["27a28665"]}))
    learner = seal.Learner(cfg, str(tiny_dir))
    dom = arc_domain.Arc(cfg, learner.tok)
    task, m = dom.tasks["27a28665"], learner.m
    untrained = dom.teacher_forced(m, task)
    examples = []
    for ti, (_, truth) in enumerate(task.test):
        queries, prompts, _, _ = dom.queries(task, ti)
        examples += [(p, learner.tok.encode(ttt.answer_text(ttt.transform(q.group_name, truth), "compact")))
                     for q, p in zip(queries, prompts)]
    lora.train(m, examples, lr=1e-2, epochs=20, batch_size=len(examples), loss_on="completion", seed=0,
               adapter=learner.adapter)
    trained = dom.teacher_forced(m, task)
    assert trained["token_acc"] > untrained["token_acc"] and trained["loglik"] > untrained["loglik"]
    accs, solved = [], []
    for test_in, truth in task.test:
        one = ttt.Task(task.id, task.train, [(test_in, truth)])
        accs.append(dom.teacher_forced(m, one)["token_acc"])
        solved.append(ttt.solved([dom.answer(m, one, 0)[0]], [truth]))
        if accs[-1] == 1.0:  # where the model writes the truth, any other answer scores lower
            wrong = dom.teacher_forced(m, ttt.Task(task.id, task.train, [(test_in, (truth + 1) % 10)]))
            assert wrong["token_acc"] < 1.0 and wrong["loglik"] < dom.teacher_forced(m, one)["loglik"]
    assert [a == 1.0 for a in accs] == solved
    assert True in solved and False in solved  # both directions were exercised (pinned model and task)


def test_graded_reward_puts_solved_first():
    """Solved ranks first, then token accuracy, then log-likelihood; an invalid self-edit ranks below all."""
    key = arc_domain.graded_key
    solved_poor = {"score": 1.0, "token_acc": 0.0, "loglik": -9.0}
    unsolved_best = {"score": 0.0, "token_acc": 1.0, "loglik": -0.01}
    assert key(solved_poor) > key(unsolved_best)
    assert key({"score": 0.0, "token_acc": 0.5, "loglik": -1.0}) > key({"score": 0.0, "token_acc": 0.5, "loglik": -2.0})
    assert key({"valid": False, "reward": 0.0}) < key({"score": 0.0, "token_acc": 0.0, "loglik": -50.0})


def test_cells_right_takes_the_better_attempt_and_zero_for_another_shape():
    truth = np.array([[1, 2], [3, 4]])
    assert ttt.cells_right([[np.array([[1, 2], [3, 0]]), np.array([[1, 0], [0, 0]])]], [truth]) == 0.75
    assert ttt.cells_right([[np.array([[1, 2, 3]])]], [truth]) == 0.0


def rec(item, k, score, acc, loglik=-1.0, before=0.3):
    return {"item": item, "k": k, "score": score, "token_acc": acc, "loglik": loglik, "valid": True,
            "unadapted": {"token_acc": before, "loglik": -2.0}}


def test_graded_e_step_keeps_each_tasks_best_over_the_unadapted_model(tiny_dir):
    """Best of k per RL task, only where it beats the model before training, never a task whose samples tie."""
    dom = arc_domain.Arc(config(tiny_dir), seal.Learner(config(tiny_dir), str(tiny_dir)).tok)
    records = [rec("a", 0, 0.0, 0.5), rec("a", 1, 0.0, 0.7), rec("a", 2, 0.0, 0.6),   # keeps a#1
               rec("b", 0, 0.0, 0.2), rec("b", 1, 0.0, 0.3, loglik=-2.5),             # none beats b's 0.3, -2.0
               rec("c", 0, 0.0, 0.6), rec("c", 1, 0.0, 0.6),                          # all alike: nothing to learn
               rec("d", 0, 0.0, 0.9), rec("d", 1, 1.0, 0.2),                          # solved first: d#1
               {"item": "e", "k": 0, "valid": False, "reward": 0.0, "score": 0.0},
               {"item": "e", "k": 1, "valid": False, "reward": 0.0, "score": 0.0}]
    assert [(r["item"], r["k"]) for r in dom.select(records)] == [("a", 1), ("d", 1)]
    solved = arc_domain.Arc(config(tiny_dir, reward="solved"), dom.tok)  # the official filter: reward 1 only
    assert solved.select([{**r, "reward": r["score"]} for r in records]) == [{**records[8], "reward": 1.0}]


def test_graded_run_records_both_rewards_and_keeps_only_improvements(tiny_dir, tmp_path):
    """A tiny run under the graded reward: every record holds pass@2 as its score and (solved + token accuracy)/2
    as its reward, with the unadapted measure beside it; the M-step trains on what the E-step's rule keeps."""
    cfg = config(tiny_dir, tmp_path / "run", rl_samples=3, se_mode="schema", se_lr_options="1e-3,2e-2",
                 se_epoch_options="1,2")
    res = seal.run(cfg, arc_domain.Arc)
    recs = [json.loads(line) for line in (tmp_path / "run" / "evals.jsonl").read_text().splitlines()]
    rl = [r for r in recs if r["phase"] == "rl1"]
    assert len(rl) == 3
    for r in rl:
        assert r["score"] in (0.0, 1.0) and r["reward"] == pytest.approx((r["score"] + r["token_acc"]) / 2)
        assert 0 <= r["unadapted"]["token_acc"] <= 1 and math.isfinite(r["unadapted"]["loglik"])
    kept = arc_domain.Arc(cfg, None).select(rl)
    (rnd,) = res["rounds"]
    assert (rnd["m_step"] or {"examples": 0})["examples"] == len(kept)
    assert {"token_acc", "loglik", "cells", "unadapted_token_acc"} <= set(rnd["metrics"])


def test_a_folder_made_under_the_other_reward_is_refused(tmp_path):
    run_folder.RunFolder(arc_domain.ArcConfig(out=str(tmp_path), reward="solved"))
    with pytest.raises(SystemExit, match="reward"):
        run_folder.RunFolder(arc_domain.ArcConfig(out=str(tmp_path), reward="graded"))
    with pytest.raises(SystemExit, match="reward"):
        arc_domain.Arc(arc_domain.ArcConfig(reward="pass@1"), None)


def test_ttt_base_keeps_the_adapted_model_while_the_policy_moves(tiny_dir, tmp_path):
    """--ttt_base=base: the M-step moves the policy (what samples) and leaves the model the inner loop adapts, also
    after the policy is loaded back from its folder (a resumed round). --ttt_base=policy (official): both move."""
    records = lambda learner, dom: [{"item": "6150a2bd", "prompt_ids": dom.prompt_ids("6150a2bd", learner.tok),
                                     "ids": learner.tok.encode('{"x": 1}')}] * 2
    weights = lambda m: torch.cat([p.detach().flatten().float() for n, p in m.named_parameters()
                                   if "lora" not in n])
    for ttt_base, adapted_moves in (("base", False), ("policy", True)):
        cfg = config(tiny_dir, tmp_path / ttt_base, ttt_base=ttt_base, sft_lr=1e-2)
        learner = seal.Learner(cfg, cfg.model)
        dom = arc_domain.Arc(cfg, learner.tok)
        before = weights(learner.m)
        learner.m_step(records(learner, dom), "rl1", tmp_path / ttt_base / "policy")
        assert not torch.equal(weights(learner.policy()), before)
        assert torch.equal(weights(learner.m), before) != adapted_moves
        learner.load(tmp_path / ttt_base / "policy")  # what a resumed round does
        assert not torch.equal(weights(learner.policy()), before)
        assert torch.equal(weights(learner.m), before) != adapted_moves
