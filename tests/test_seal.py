"""The ReST-EM loop end to end on a tiny random model, and resume after a crash."""
import json
import shutil

import pytest
import torch

import arc_domain
import model
import seal
from conftest import LLAMA, random_model

SPLIT = {"rl": ["6150a2bd"], "eval": ["5582e5ca"]}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_dir):
    """A 2-layer random Llama with the real SmolLM2 tokenizer (so chat formatting and parsing are real)."""
    d = tmp_path_factory.mktemp("tiny")
    model.save(random_model({**LLAMA, "vocab_size": 49152, "bos_token_id": 1, "eos_token_id": 2}, std=0.02), d,
               tokenizer_dir=smollm2_dir)
    (d / "split.json").write_text(json.dumps(SPLIT))
    return d


def config(tiny_dir, out, **kw):
    base = dict(model=str(tiny_dir), split=str(tiny_dir / "split.json"), out=str(out), fmt="compact",
                rl_samples=2, eval_samples=1, se_max_tokens=24, max_examples=4, warmup=1, sft_epochs=1)
    return seal.RunConfig(**{**base, **kw})


def keep_all(self, records):  # a random model never earns a reward: keep everything so the M-step runs
    return records


def test_end_to_end_smoke(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(arc_domain.ArcDomain, "select", keep_all)
    res = seal.run(config(tiny_dir, tmp_path / "run"))
    assert [r["row"] for r in res["rows"]] == ["icl", "base", "seal", "oracle"]
    assert {r["row"]: r["total"] for r in res["rows"]} == {"icl": 1, "base": 1, "seal": 1, "oracle": 1}
    recs = [json.loads(line) for line in (tmp_path / "run" / "evals.jsonl").read_text().splitlines()]
    assert sorted({r["phase"] for r in recs}) == ["base", "icl", "oracle", "rl1", "seal"]
    assert len([r for r in recs if r["phase"] == "rl1"]) == 2
    oracle = next(r for r in recs if r["phase"] == "oracle")
    assert oracle["valid"] and oracle["train"]["steps"] > 0  # the fixed config trains
    assert (tmp_path / "run" / "policy-round1" / "DONE").exists()
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["rows"] == res["rows"]
    (rnd,) = saved["rounds"]  # the ReST-EM round: everything kept, so the M-step trained on both
    assert (rnd["samples"], rnd["m_step"]["examples"]) == (2, 2) and rnd["m_step"]["steps"] > 0


def test_resume_after_a_crash_repeats_nothing(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(arc_domain.ArcDomain, "select", keep_all)
    evaluate = arc_domain.ArcDomain.evaluate
    calls = []

    def counting(self, m, item, text, seed):
        calls.append((item, seed))
        if len(calls) == 4 and crash[0]:
            raise KeyboardInterrupt("injected failure")
        return evaluate(self, m, item, text, seed)

    monkeypatch.setattr(arc_domain.ArcDomain, "evaluate", counting)
    crash = [True]
    with pytest.raises(KeyboardInterrupt):
        seal.run(config(tiny_dir, tmp_path / "a"))
    done_before = len((tmp_path / "a" / "evals.jsonl").read_text().splitlines())
    assert done_before == 3
    crash[0] = False
    calls.clear()
    resumed = seal.run(config(tiny_dir, tmp_path / "a"))
    assert len(calls) == 6 - done_before and len(set(calls)) == len(calls)  # nothing evaluated twice
    calls.clear()
    straight = seal.run(config(tiny_dir, tmp_path / "b"))
    assert len(calls) == 6
    assert resumed["rows"] == straight["rows"]
    a = [json.loads(x) for x in (tmp_path / "a" / "evals.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "b" / "evals.jsonl").read_text().splitlines()]
    strip = lambda r: {k: v for k, v in r.items() if k not in ("seconds", "eval_seconds", "train")}
    key = lambda r: (r["phase"], r["item"], r["k"])
    assert sorted(map(strip, a), key=key) == sorted(map(strip, b), key=key)


def test_a_run_folder_refuses_other_settings(tiny_dir, tmp_path):
    seal.RunFolder(config(tiny_dir, tmp_path))
    with pytest.raises(SystemExit, match="other settings"):
        seal.RunFolder(config(tiny_dir, tmp_path, seed=1))
    items = {"rl": ["5582e5ca"], "eval": ["0d3d703e"]}
    seal.RunFolder(config(tiny_dir, tmp_path / "b"), items)
    with pytest.raises(SystemExit, match="other settings.*items"):  # the split file changed under its name
        seal.RunFolder(config(tiny_dir, tmp_path / "b"), {**items, "eval": ["a85d4709"]})


def test_a_line_cut_by_a_kill_is_dropped(tiny_dir, tmp_path):
    run = seal.RunFolder(config(tiny_dir, tmp_path))
    run.log({"phase": "icl", "item": "x", "k": 0, "reward": 1.0})
    with open(run.evals_file, "a") as f:
        f.write('{"phase": "icl", "item": "y", "k": 0, "rew')
    again = seal.RunFolder(config(tiny_dir, tmp_path))
    assert list(again.done) == [("icl", "x", 0)]


def test_overrides_are_typed_and_checked():
    cfg = seal.parse_overrides(seal.RunConfig(), ["--rounds=2", "--sft_lr=1e-4", "--se_mode=schema"])
    assert (cfg.rounds, cfg.sft_lr, cfg.se_mode) == (2, 1e-4, "schema")
    with pytest.raises(SystemExit, match="unknown setting --roundz"):
        seal.parse_overrides(seal.RunConfig(), ["--roundz=2"])
    with pytest.raises(SystemExit, match="expects int"):
        seal.parse_overrides(seal.RunConfig(), ["--rounds=two"])


def test_schema_mode_samples_only_valid_self_edits(tiny_dir, tmp_path, monkeypatch):
    import arc
    monkeypatch.setattr(arc_domain.ArcDomain, "select", keep_all)
    seal.run(config(tiny_dir, tmp_path, se_mode="schema", rows="base", eval_samples=3))
    recs = [json.loads(x) for x in (tmp_path / "evals.jsonl").read_text().splitlines()]
    assert len(recs) == 3 and all(arc.parse_self_edit(r["text"])[0] is not None for r in recs)
    assert all(r["valid"] or "step cap" in r["reason"] for r in recs)


def test_template_sampling_follows_the_models_probabilities(tiny_dir):
    m, tok = model.load(str(tiny_dir))
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
    greedy = seal.sample_template(m, tok, prompt, template, n=1, temperature=0, trace=trace)[0]
    assert tok.decode(greedy) == f" answer={best}!"
    assert trace == [pytest.approx(scores, abs=1e-4)]  # what it sampled from, one list per field
    drawn = [tok.decode(x) for x in seal.sample_template(m, tok, prompt, template, n=40, temperature=1.0, seed=1)]
    assert all(d in {f" answer={o}!" for o in options} for d in drawn)
    assert len(set(drawn)) > 1


def test_a_round_that_keeps_nothing_saves_no_weights(tiny_dir, tmp_path):
    cfg = config(tiny_dir, tmp_path, rows="seal", se_mode="schema")
    first = seal.run(cfg)  # a random model solves nothing, so the E-step keeps nothing
    policy = tmp_path / "policy-round1"
    assert (policy / "DONE").read_text() == "unchanged\n" and not (policy / "model.safetensors").exists()
    (rnd,) = first["rounds"]
    assert (rnd["samples"], rnd["rewarded"], rnd["m_step"]) == (2, 0, None)
    assert seal.run(cfg)["rows"] == first["rows"]  # and a resume goes straight through


def test_schema_prompt_offers_the_schema_values(tiny_dir):
    m, tok = model.load(str(tiny_dir))
    cfg = config(tiny_dir, "unused", se_mode="schema", se_lr_options="3e-4,1e-3,3e-3", se_epoch_options="1,3,6")
    dom = arc_domain.ArcDomain(cfg, tok)
    text = tok.decode(dom.prompt_ids("6150a2bd"))
    assert "one of 3e-4, 1e-3, 3e-3" in text and "1e-5" not in text
    assert "passes over the data, one of 1, 3, 6" in text
    assert dict(dom.template)[', "num_train_epochs": '] == ["1", "3", "6"]
    free = arc_domain.ArcDomain(config(tiny_dir, "unused"), tok)  # free mode: the official wording, no list
    assert "passes over the data\n" in tok.decode(free.prompt_ids("6150a2bd"))


def test_choices_count_what_parsed_self_edits_picked():
    import arc
    edits = [arc.SelfEdit(True, False, False, False, "all", 1e-3, 1), arc.SelfEdit(True, True, True, True, "output",
                                                                                   3e-3, 2)]
    recs = [{"edit": e.to_dict(), "reward": 1.0} for e in edits] + [{"valid": False, "reason": "bad json"}]
    assert arc_domain.ArcDomain.choices(recs) == {
        "loss": {"all_tokens": 1, "output_tokens": 1}, "learning_rate": {"0.001": 1, "0.003": 1},
        "epochs": {"1": 1, "2": 1}, "augmentations_on": {"1": 1, "4": 1}}


def test_filter_scores_each_config_over_seeds(tiny_dir, capsys):
    arc_domain.filter_tasks([f"--model={tiny_dir}", "--ids=5582e5ca", "--configs=all:1e-3:1,output:3e-3:2",
                             "--seeds=0,1", "--max_examples=2", "--max_len=2048"])
    header, line = capsys.readouterr().out.strip().splitlines()
    assert "seeds [0, 1]" in header
    assert line.startswith("5582e5ca (truth 888/888/888): all:1e-3:1=0/2 (") and "output:3e-3:2=0/2 (" in line
    assert line.count("said 0; 0") == 2  # one answer per seed: a random model writes no valid grid


def test_policy_prints_each_fields_option_probabilities(tiny_dir, capsys):
    def policy(temperature):
        arc_domain.print_policy([f"--model={tiny_dir}", f"--split={tiny_dir / 'split.json'}",
                                 "--se_epoch_options=1,2,4,6", f"--se_temperature={temperature}"])
        header, *lines = capsys.readouterr().out.strip().splitlines()
        assert header.endswith(f"at temperature {temperature:g}")
        out = {}
        for line in lines:
            item, rest = line.split(" ", 1)
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


def test_unknown_subcommand_prints_the_usage():
    import subprocess
    import sys
    res = subprocess.run([sys.executable, "arc_domain.py", "nope"], capture_output=True, text=True,
                         cwd=arc_domain.__file__.rsplit("/", 1)[0])
    assert res.returncode == 1 and "python arc_domain.py policy" in res.stderr
