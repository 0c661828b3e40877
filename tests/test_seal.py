"""The shared loop (seal.py) driven by a small fake domain whose reward is known: the E-step filter, the M-step on
exactly the kept records, the report, resume, and the model's one owner. No ARC, no knowledge."""
import json
import re
from pathlib import Path
from dataclasses import dataclass

import pytest
import torch

import lora
import checkpoint
import sampling
import settings
import run_folder
import seal


@pytest.fixture(scope="module")
def tiny_dir(tiny_chat_dir):
    return tiny_chat_dir


@dataclass
class FakeConfig(seal.RunConfig):
    word: str = "yes"         # the rewarded answer


class Fake(seal.Domain):
    """Self-edit = " pick yes" or " pick no" (schema mode); reward 1 for yes. Each evaluation really trains the
    adapter it is handed on the self-edit's tokens, so the loop's adapter handling is exercised."""
    template = [(" pick ", ["yes", "no"]), (".", None)]
    rows = (seal.Row("none", "no adaptation", "-", seal.NONE),
            seal.Row("fixed", "fixed yes", "1", seal.FIXED, text=" pick yes."),
            seal.Row("base", "base policy", "?", seal.BASE), seal.Row("rl", "after ReST-EM", "?", seal.RL))
    calls = []
    crash_after = 0           # raise at this evaluation (0: never), to test resume

    def __init__(self, cfg, tok):
        super().__init__(cfg, tok)
        self.rl_items, self.eval_items = ["r1", "r2", "r3"], ["e1", "e2"]

    def prompt_ids(self, item, tok):
        return tok.encode(f"Item {item}: pick yes or no?")

    def evaluate(self, m, adapter, item, text, seed):
        Fake.calls.append((item, seed))
        if Fake.crash_after and len(Fake.calls) == Fake.crash_after:
            raise KeyboardInterrupt("injected crash")
        untouched = all(not p.any() for p in adapter.params()[1::2])  # every B is zero: the loop reset it
        if text is None:
            return {"reward": 0.0, "untouched": untouched}
        res = lora.train(m, [([], self.tok.encode(text))], lr=1e-2, epochs=1, batch_size=1, loss_on="all",
                         adapter=adapter, seed=seed)
        return {"reward": float(self.cfg.word in text), "steps": res.steps, "untouched": untouched}

    def choices(self, records):
        return {"said": {w: sum(w in (r["text"] or "") for r in records) for w in ("yes", "no")}}


def config(tiny_dir, out, **kw):
    base = dict(model=str(tiny_dir), out=str(out), rl_samples=4, eval_samples=2, se_temperature=1.0, sft_lr=3e-2,
                sft_epochs=4, sft_batch=2, inner_rank=4, inner_alpha=8.0, sft_rank=8, sft_alpha=16.0)
    return FakeConfig(**{**base, **kw})


def p_yes(policy_dir_or_name, prompt="Item e1: pick yes or no?"):
    m, tok = checkpoint.load(str(policy_dir_or_name))
    trace = []
    sampling.sample_template(m, tok, tok.encode(prompt), Fake.template, temperature=0, trace=trace)
    return torch.softmax(torch.tensor(trace[0]), -1)[0].item()


def test_the_loop_keeps_exactly_the_rewarded_and_clones_them(tiny_dir, tmp_path):
    res = seal.run(config(tiny_dir, tmp_path), Fake)
    recs = [json.loads(x) for x in (tmp_path / "evals.jsonl").read_text().splitlines()]
    rl = [r for r in recs if r["phase"] == "rl1"]
    assert len(rl) == 3 * 4 and {r["item"] for r in rl} == {"r1", "r2", "r3"}
    kept = [r for r in rl if r["reward"] == 1]
    assert 0 < len(kept) < len(rl)  # the sampled policy says both, so the filter has something to do
    m_step = json.loads((tmp_path / "policy-round1" / "m_step.json").read_text())
    assert m_step["examples"] == len(kept) and sorted(m_step["items"]) == sorted(r["item"] for r in kept)
    assert m_step["steps"] == 4 * -(-len(kept) // 2)  # 4 epochs of batches of 2
    assert all(r["untouched"] for r in recs)  # every evaluation started from a zero adapter
    assert all(r["valid"] and r["weight"] == 1 and r["score"] == r["reward"] for r in recs)  # the record's defaults
    assert not any("shared_with" in r for r in recs)  # a seed per self-edit: equal texts are separate draws
    # the M-step cloned "yes": the merged policy prefers it more than the base model did
    assert p_yes(tmp_path / "policy-round1") > p_yes(tiny_dir) + 0.1
    table = {r["row"]: r for r in res["rows"]}
    assert list(table) == ["none", "fixed", "base", "rl"]
    assert (table["none"]["score"], table["fixed"]["score"], table["fixed"]["total"]) == (0, 2, 2)
    assert table["base"]["total"] == table["rl"]["total"] == 4
    assert table["rl"]["choices"]["said"]["yes"] == table["rl"]["score"]
    assert res["rounds"][0]["rewarded"] == len(kept)
    assert res["rounds"][0]["kept_choices"]["said"] == {"yes": len(kept), "no": 0}  # what the M-step cloned
    assert res["rounds"][0]["choices"]["said"]["no"] > 0  # against all it sampled
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == res["rows"]


def test_best_per_item_keeps_one_per_item_even_below_zero():
    recs = [{"item": "a", "reward": 0.2, "k": 0}, {"item": "a", "reward": 0.6, "k": 1},
            {"item": "b", "reward": 0.0, "k": 0}, {"item": "b", "reward": 0.0, "k": 1},
            {"item": "a", "reward": 0.6, "k": 2}]
    assert [(r["item"], r["k"]) for r in seal.best_per_item(recs)] == [("a", 1), ("b", 0)]
    assert seal.keep_rewarded(recs) == []


def test_resume_after_a_crash_repeats_nothing(tiny_dir, tmp_path, capsys):
    Fake.calls.clear()
    Fake.crash_after = 7
    try:
        with pytest.raises(KeyboardInterrupt):
            seal.run(config(tiny_dir, tmp_path / "a"), Fake)
    finally:
        Fake.crash_after = 0
    done_before = len((tmp_path / "a" / "evals.jsonl").read_text().splitlines())
    assert done_before == 6
    Fake.calls.clear()
    capsys.readouterr()
    resumed = seal.run(config(tiny_dir, tmp_path / "a"), Fake)
    total = 2 + 2 + 4 + 12 + 4
    assert len(Fake.calls) == total - done_before and len(set(Fake.calls)) == len(Fake.calls)
    counts = re.findall(r"run (\d+)/(\d+), run ETA", capsys.readouterr().out)  # the whole run's progress
    assert counts[0] == (str(done_before + 1), str(total)) and counts[-1] == (str(total), str(total))
    Fake.calls.clear()
    straight = seal.run(config(tiny_dir, tmp_path / "b"), Fake)
    assert len(Fake.calls) == total
    assert resumed["rows"] == straight["rows"]
    Fake.calls.clear()
    again = seal.run(config(tiny_dir, tmp_path / "b"), Fake)  # a finished run: nothing is evaluated again
    assert Fake.calls == [] and again["rows"] == straight["rows"]


def test_planned_evaluations_count_the_schedule_run_walks(tiny_dir, tmp_path):
    """The schedule: the rows on the base model, then each round and the rows after it; the progress line's total
    is what a run then evaluates (every record in the folder)."""
    cfg = config(tiny_dir, tmp_path, rounds=2, rows="none,base,rl")
    learner = seal.Learner(cfg, cfg.model)
    dom = Fake(cfg, learner.tok)
    rows = seal.pick_rows(dom, cfg.rows, cfg)
    steps = seal.schedule(rows, cfg)
    assert [s if isinstance(s, int) else s.key for s in steps] == ["none", "base", 1, 2, "rl"]
    assert seal.planned_evaluations(dom, steps, cfg) == 2 + 2 * 2 + 2 * 3 * 4 + 2 * 2
    seal.run(cfg, Fake)
    assert len((tmp_path / "evals.jsonl").read_text().splitlines()) == seal.planned_evaluations(dom, steps, cfg)


class NoEval(Fake):
    def __init__(self, cfg, tok):
        super().__init__(cfg, tok)
        self.eval_items = []


class NoRL(Fake):
    def __init__(self, cfg, tok):
        super().__init__(cfg, tok)
        self.rl_items = []


def test_empty_item_lists_are_refused(tiny_dir, tmp_path):
    with pytest.raises(SystemExit, match="NoEval has no eval_items"):
        seal.run(config(tiny_dir, tmp_path / "a"), NoEval)
    no_rl = NoRL
    with pytest.raises(SystemExit, match="NoRL has no RL items for ReST-EM round 1"):
        seal.run(config(tiny_dir, tmp_path / "b"), no_rl)
    assert not (tmp_path / "b" / "config.json").exists()  # refused before the run folder was written
    res = seal.run(config(tiny_dir, tmp_path / "c", rows="none,fixed"), no_rl)  # no round: no RL items needed
    assert [r["total"] for r in res["rows"]] == [2, 2]


class BadReward(Fake):
    """A domain under repair: its evaluate returns a NaN reward, or none at all, for item e2."""
    bad = {"reward": float("nan")}

    def evaluate(self, m, adapter, item, text, seed):
        return BadReward.bad if item == "e2" else super().evaluate(m, adapter, item, text, seed)


@pytest.mark.parametrize("bad", [{"reward": float("nan")}, {"score": 1.0}, {"reward": "1"}])
def test_a_record_without_a_finite_reward_is_refused_before_it_is_written(tiny_dir, tmp_path, bad):
    BadReward.bad = bad
    with pytest.raises(ValueError, match=r"BadReward.evaluate returned reward=.* for item 'e2' in phase 'none'"):
        seal.run(config(tiny_dir, tmp_path, rows="none"), BadReward)
    recs = [json.loads(x) for x in (tmp_path / "evals.jsonl").read_text().splitlines()]
    assert [r["item"] for r in recs] == ["e1"]  # e2's record was not written
    res = seal.run(config(tiny_dir, tmp_path, rows="none"), Fake)  # the domain fixed: the same folder resumes
    assert res["rows"][0]["total"] == 2


def test_a_round_state_is_one_of_three(tiny_dir, tmp_path):
    folder = run_folder.RunFolder(config(tiny_dir, tmp_path))
    assert folder.round_state(1) == run_folder.PENDING and folder.m_step_record(1) is None
    folder.finish_round(1, None)  # kept nothing
    assert folder.round_state(1) == run_folder.UNCHANGED and folder.m_step_record(1) is None
    folder.finish_round(2, lambda save_to: {"examples": 3, "to": str(save_to)})
    assert folder.round_state(2) == run_folder.NEW_POLICY
    assert folder.m_step_record(2) == {"examples": 3, "to": str(folder.policy_dir(2))}


def test_after_an_evaluation_the_policy_is_the_plain_model(tiny_dir):
    cfg = config(tiny_dir, "unused")
    learner = seal.Learner(cfg, cfg.model)
    dom = Fake(cfg, learner.tok)
    x = torch.tensor([dom.prompt_ids("e1", learner.tok)])
    before = learner.policy()(x)
    assert learner.evaluate(dom, "e1", " pick yes.", seed=0)["steps"] == 1
    assert any(p.any() for p in learner.adapter.params()[1::2])  # trained: B is not zero any more
    assert torch.equal(learner.policy()(x), before)


class ControlFake(Fake):
    """A CONTROL row: the domain writes each item's self-edit (yes for e1, no for e2)."""
    rows = (*Fake.rows, seal.Row("control", "the domain's own text", "-", seal.CONTROL))

    def control_text(self, row_key, item):
        return {"e1": " pick yes.", "e2": " pick no."}[item] if row_key == "control" else None


def test_a_control_row_evaluates_the_domains_text_for_each_item(tiny_dir, tmp_path):
    res = seal.run(config(tiny_dir, tmp_path, rows="control"), ControlFake)
    recs = [json.loads(x) for x in (tmp_path / "evals.jsonl").read_text().splitlines()]
    assert {r["item"]: r["text"] for r in recs} == {"e1": " pick yes.", "e2": " pick no."}
    assert all(r["phase"] == "control" and r["steps"] == 1 and r["untouched"] for r in recs)
    assert [(r["row"], r["score"], r["total"]) for r in res["rows"]] == [("control", 1, 2)]
    with pytest.raises(NotImplementedError, match="no control row"):
        seal.run(config(tiny_dir, tmp_path / "b", rows="control"), type("NoControl", (Fake,), {"rows": ControlFake.rows}))


def test_rows_are_checked_and_a_run_folder_knows_its_domain(tiny_dir, tmp_path):
    with pytest.raises(SystemExit, match=re.escape("--rows='oracle': expected one of none, fixed, base, rl")):
        seal.run(config(tiny_dir, tmp_path / "a", rows="base,oracle"), Fake)
    run_folder.RunFolder(config(tiny_dir, tmp_path / "b"))
    with pytest.raises(SystemExit, match="other settings.*config: 'FakeConfig' there, 'RunConfig' now"):
        run_folder.RunFolder(seal.RunConfig(**{k: v for k, v in vars(config(tiny_dir, tmp_path / "b")).items()
                                          if k != "word"}))


def test_a_run_folder_refuses_other_settings(tiny_dir, tmp_path):
    run_folder.RunFolder(config(tiny_dir, tmp_path))
    with pytest.raises(SystemExit, match="other settings"):
        run_folder.RunFolder(config(tiny_dir, tmp_path, seed=1))
    items = {"rl": ["5582e5ca"], "eval": ["0d3d703e"]}
    run_folder.RunFolder(config(tiny_dir, tmp_path / "b"), items)
    with pytest.raises(SystemExit, match="other settings.*items"):  # the data file changed under its name
        run_folder.RunFolder(config(tiny_dir, tmp_path / "b"), {**items, "eval": ["a85d4709"]})


def test_a_line_cut_by_a_kill_is_dropped(tiny_dir, tmp_path):
    run = run_folder.RunFolder(config(tiny_dir, tmp_path))
    run.log({"phase": "icl", "item": "x", "k": 0, "reward": 1.0})
    with open(run.evals_file, "a") as f:
        f.write('{"phase": "icl", "item": "y", "k": 0, "rew')
    again = run_folder.RunFolder(config(tiny_dir, tmp_path))
    assert list(again.done) == [("icl", "x", 0)]


def test_a_record_is_read_once_and_never_appended_twice(tiny_dir, tmp_path, capsys):
    """A folder written by two runs at once (before it had a lock) holds repeats: each is read once, with a
    warning, and this rank's file is rewritten without them; a record already there is not appended again."""
    run = run_folder.RunFolder(config(tiny_dir, tmp_path))
    first, other = {"phase": "icl", "item": "x", "k": 0, "reward": 1.0}, {"phase": "icl", "item": "y", "k": 0}
    with open(run.evals_file, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in (first, other, {**first, "reward": 0.0})))
    (tmp_path / "evals-1.jsonl").write_text(json.dumps({**other, "reward": 0.5}) + "\n")
    capsys.readouterr()
    again = run_folder.RunFolder(config(tiny_dir, tmp_path))
    assert "records 2 evaluation(s) more than once" in capsys.readouterr().out
    assert again.done == {("icl", "x", 0): first, ("icl", "y", 0): {**other, "reward": 0.5}}  # evals-1 sorts first
    assert [json.loads(x) for x in again.evals_file.read_text().splitlines()] == [first]
    again.log({**first, "reward": 0.0})
    assert again.evals_file.read_text().count("\n") == 1 and again.done[("icl", "x", 0)] == first


def test_overrides_are_typed_and_checked():
    cfg = settings.parse_overrides(FakeConfig(), ["--rounds=2", "--sft_lr=1e-4", "--word=no"])
    assert (cfg.rounds, cfg.sft_lr, cfg.word) == (2, 1e-4, "no")
    with pytest.raises(SystemExit, match="unknown setting --roundz"):
        settings.parse_overrides(FakeConfig(), ["--roundz=2"])
    with pytest.raises(SystemExit, match="expects int"):
        settings.parse_overrides(FakeConfig(), ["--rounds=two"])
    with pytest.raises(SystemExit, match="unknown setting --word"):  # a domain's key is not shared
        settings.parse_overrides(seal.RunConfig(), ["--word=no"])


def test_template_sampling_follows_the_models_probabilities(tiny_dir):
    m, tok = checkpoint.load(str(tiny_dir))
    prompt = tok.encode("Pick one:")
    options = ["true", "false", "3e-3", "1e-4"]
    template = [(" answer=", options), ("!", None)]
    # reference: the full-sequence log-probability of each option, one forward each
    scores = []
    for o in options:
        ids = prompt + tok.encode(" answer=") + tok.encode(o)
        with torch.no_grad():
            lp = torch.log_softmax(m(torch.tensor([ids]))[0], -1)
        n = len(tok.encode(o))
        scores.append(sum(lp[len(ids) - n - 1 + t, ids[len(ids) - n + t]].item() for t in range(n)))
    best = options[max(range(len(options)), key=scores.__getitem__)]
    trace = []
    greedy = sampling.sample_template(m, tok, prompt, template, n=1, temperature=0, trace=trace)[0]
    assert tok.decode(greedy) == f" answer={best}!"
    assert trace == [pytest.approx(scores, abs=1e-4)]  # what it sampled from, one list per field
    drawn = [tok.decode(x) for x in sampling.sample_template(m, tok, prompt, template, n=40, temperature=1.0, seed=1)]
    assert all(d in {f" answer={o}!" for o in options} for d in drawn)
    assert len(set(drawn)) > 1


class FreeFake(Fake):
    template = None  # free text: sampled with sampling.generate_ids


def test_free_sampling_does_not_depend_on_the_batching(tiny_dir, tmp_path):
    import dataclasses
    cfg = config(tiny_dir, tmp_path, se_max_tokens=10)
    learner = seal.Learner(cfg, str(tiny_dir))
    dom = FreeFake(cfg, learner.tok)
    runs = [seal.sample_self_edits(learner.policy(), learner.tok, dom, dom.rl_items, 3,
                                   dataclasses.replace(cfg, eval_batch=b), "rl1") for b in (3, 32)]
    texts = [[j["text"] for j in r] for r in runs]
    assert texts[0] == texts[1]  # 3 batches of one item, or one batch of all three: the same self-edits
    assert len(set(texts[0][:3])) > 1 and texts[0][:3] != texts[0][3:6]


def test_the_e_step_samples_at_its_own_temperature(tiny_dir, tmp_path):
    """--rl_temperature is the RL round's sampling temperature; 0 means --se_temperature's."""
    def rl_samples(t):
        seal.run(config(tiny_dir, tmp_path / str(t), se_max_tokens=8, se_temperature=0.7, rl_temperature=t,
                        rows="rl"), FreeFake)
        return [j["text"] for j in json.loads((tmp_path / str(t) / "samples-rl1.json").read_text())]
    same, explicit, hot = rl_samples(0.0), rl_samples(0.7), rl_samples(3.0)
    assert same == explicit and hot != same


class OneDrawFake(Fake):
    """One inner-loop seed per item, as ARC's: identical self-edits of an item are one evaluation."""

    def evaluation_seed(self, phase, item, k):
        return seal.stable_seed(self.cfg.seed, item)


def evals(out):
    return [json.loads(x) for f in sorted(Path(out).glob("evals*.jsonl")) for x in f.read_text().splitlines()]


def check_shared(recs):
    """Every (phase, item, k) has one record; a later self-edit equal to an earlier one of its item copies that
    one's record (its own k, text and tokens; "shared_with" the earlier k); every distinct one has its own."""
    assert len({(r["phase"], r["item"], r["k"]) for r in recs}) == len(recs)
    own = ("k", "text", "prompt_ids", "ids", "seconds", "shared_with")
    for r in recs:
        first = min((x for x in recs if (x["phase"], x["item"], x["text"]) == (r["phase"], r["item"], r["text"])),
                    key=lambda x: x["k"])
        if first is r:
            assert "shared_with" not in r
        else:
            assert r["shared_with"] == first["k"] and r["seconds"] == 0
            assert {k: v for k, v in r.items() if k not in own} == {k: v for k, v in first.items() if k not in own}
    return sum("shared_with" not in r for r in recs)


def test_identical_self_edits_are_evaluated_once_and_share_the_record(tiny_dir, tmp_path):
    Fake.calls.clear()
    seal.run(config(tiny_dir, tmp_path), OneDrawFake)
    recs = evals(tmp_path)
    rl = [r for r in recs if r["phase"] == "rl1"]
    assert len(rl) == 3 * 4 and check_shared(rl) == len({(r["item"], r["text"]) for r in rl}) < len(rl)  # 4 of 2
    assert len([c for c in Fake.calls if c[0].startswith("r")]) == check_shared(rl)  # the RL items' evaluations
    assert len(Fake.calls) == sum(check_shared([r for r in recs if r["phase"] == p]) for p in {r["phase"] for r in recs})
    m_step = json.loads((tmp_path / "policy-round1" / "m_step.json").read_text())
    assert m_step["examples"] == sum(r["reward"] == 1 for r in rl)  # a shared record is kept like any other


def test_a_kill_between_an_evaluation_and_its_copy_resumes_without_evaluating_again(tiny_dir, tmp_path):
    cfg = lambda out: config(tiny_dir, out, rows="base", eval_samples=4)  # 2 items x 4 samples of yes or no
    Fake.calls.clear()
    seal.run(cfg(tmp_path / "a"), OneDrawFake)
    straight = evals(tmp_path / "a")
    assert check_shared(straight) < len(straight) and len(Fake.calls) == check_shared(straight)
    # kill -9 right after an evaluation whose copy comes later: the file ends at that evaluation's line
    cut = next(i for i, r in enumerate(straight)
               if any(x.get("shared_with") == r["k"] and x["item"] == r["item"] for x in straight[i + 1:]))
    (tmp_path / "a" / "evals.jsonl").write_text("".join(json.dumps(r) + "\n" for r in straight[:cut + 1]))
    Fake.calls.clear()
    seal.run(cfg(tmp_path / "a"), OneDrawFake)
    resumed = evals(tmp_path / "a")
    assert len(Fake.calls) == sum("shared_with" not in r for r in straight[cut + 1:])  # the copy: no evaluation
    key = lambda r: (r["item"], r["k"])
    strip = lambda rs: sorted(({k: v for k, v in r.items() if k != "seconds"} for r in rs), key=key)
    assert strip(resumed) == strip(straight)
    check_shared(resumed)


class ThreadRanks:
    """Two ranks of one process, as threads: what evaluate_phase needs of torchrun's (a rank, a barrier)."""

    def __init__(self, rank, world, barrier):
        self.rank, self.world, self._barrier = rank, world, barrier
        self.main = rank == 0

    def barrier(self):
        self._barrier.wait(timeout=120)  # a rank that waits forever fails the test instead of hanging it


def test_two_ranks_evaluate_each_distinct_self_edit_once(tiny_dir, tmp_path):
    """The first yes is job 0 (rank 0's by position in the job list) and its equals are jobs 2 and 3 (rank 0's and
    rank 1's): the rank that evaluates a self-edit writes its copies, so neither rank waits for the other."""
    import threading
    texts = [" pick yes.", " pick no.", " pick yes.", " pick yes.", " pick no.", " pick yes."]
    jobs = [{"item": "e1", "k": k, "text": t} for k, t in enumerate(texts)]

    def phase(out, world):
        cfg = config(tiny_dir, out)
        barrier = threading.Barrier(world)
        folders = [run_folder.RunFolder(cfg, ranks=ThreadRanks(r, world, barrier)) for r in range(world)]
        got, errors = {}, []

        def rank(r):
            try:
                learner = seal.Learner(cfg, cfg.model)
                got[r] = seal.evaluate_phase(folders[r], learner, OneDrawFake(cfg, learner.tok), "base", jobs, cfg)
            except Exception as e:  # noqa: BLE001 (reported below)
                errors.append(e)
                barrier.abort()
        threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert all(got[r] == got[0] for r in range(world))  # every rank reads every record after the sync
        return [{k: v for k, v in rec.items() if k != "seconds"} for rec in got[0]]

    Fake.calls.clear()
    two = phase(tmp_path / "two", 2)
    assert len(Fake.calls) == 2  # yes and no, once each over both ranks
    assert (tmp_path / "two" / "evals-1.jsonl").exists()  # rank 1 evaluated one of them
    assert [r.get("shared_with") for r in two] == [None, None, 0, 0, 1, 0]
    Fake.calls.clear()
    assert phase(tmp_path / "one", 1) == two and len(Fake.calls) == 2
