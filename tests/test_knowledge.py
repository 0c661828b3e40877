"""Knowledge incorporation (domains/knowledge_text.py, domains/knowledge.py, domains/knowledge_studies.py): graders,
self-edit splitting, the shipped data, and the domain through the shared loop on a tiny random model (end to end,
resume, CPT, the reward, forgetting, bad input)."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoint
import seal
import settings
from conftest import ROOT
from domains import knowledge as kn
from domains import knowledge_studies as ks
from domains import knowledge_text as kt

SEAL_REF = ROOT.parent / "shared" / "seal-ref" / "knowledge"


# -----------------------------------------------------------------------------
# Graders: SQuAD v1.1's normalisation, exact match and F1 (evaluate-v1.1.py), and the lenient match


@pytest.mark.parametrize("text, norm", [
    ("The Cat's  hat!", "cats hat"), ("An apple, a pear and THE end.", "apple pear and end"),
    ("  1,908 ", "1908"), ("theatre anthem", "theatre anthem"), ("", "")])
def test_normalize_as_squad(text, norm):
    assert kt.normalize(text) == norm


@pytest.mark.parametrize("pred, gold, em, f1, lenient", [
    ("Pebblemouth", "Pebblemouth", 1, 1.0, 1),
    ("the town of Pebblemouth.", "Pebblemouth", 0, 0.5, 1),             # "town of pebblemouth": p 1/3, r 1
    ("cat sat", "the cat sat on mat", 0, 2 * 1 * 0.5 / 1.5, 0),
    ("in 1908", "1908", 0, 2 / 3, 1),
    ("19089", "1908", 0, 0.0, 0),                                        # whole words only
    ("", "1908", 0, 0.0, 0),
    ("red red red", "red", 0, 0.5, 1),                                   # SQuAD counts common tokens with Counter
])
def test_graders_pinned(pred, gold, em, f1, lenient):
    assert kt.exact(pred, gold) == em
    assert kt.f1(pred, gold) == pytest.approx(f1)
    assert kt.lenient(pred, gold) == lenient


def test_judge_reply_rule():
    assert kt.judge_says_yes("Yes.") and kt.judge_says_yes("yes, it does")
    assert not kt.judge_says_yes("Yes and no") and not kt.judge_says_yes("No") and not kt.judge_says_yes("")


def test_the_text_toolkit_needs_no_torch():
    code = "import sys, domains.knowledge_text; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# -----------------------------------------------------------------------------
# Self-edits -> training sequences (the official build_train_sequences rules)

P = {"title": "Gannet Clock Tower", "context": "It was built in 1908.", "questions": [{"question": "q", "answer": "1908"}]}


def test_implication_lines_drop_the_preamble_and_split_on_dashes():
    text = "Here are some implications:\n1. It is old.\n\n2. It has a gannet.\n---\nIt stands on a pier.\n"
    assert kt.self_edit_lines(text, "implications") == ["1. It is old.", "2. It has a gannet.", "It stands on a pier."]
    assert kt.self_edit_lines("A.\nB.", "rewrite") == ["A.", "B."]           # no "1." on line 2: nothing dropped
    assert kt.self_edit_lines("  \n\n", "implications") == []


def test_self_qa_splits_at_question_numbers():
    text = "Question 1: When? Answer: 1908.\nQuestion 2: Who?\nAnswer: Lionel."
    assert kt.self_edit_lines(text, "self-qa") == ["Question 1: When? Answer: 1908.", "Question 2: Who?\nAnswer: Lionel."]


def test_training_texts_prefix_the_title_and_end_with_the_passage():
    assert kt.training_texts(P, "It is old.\nIt chimes.", "implications") == [
        "Gannet Clock Tower\nIt is old.", "Gannet Clock Tower\nIt chimes.", "Gannet Clock Tower\nIt was built in 1908."]
    assert kt.training_texts(P, "", "implications") == ["Gannet Clock Tower\nIt was built in 1908."]  # passage only


@pytest.mark.parametrize("text, sentences", [
    ("Dr. Ames met Mr. Bell at St. Olave's. It rained.", ["Dr. Ames met Mr. Bell at St. Olave's.", "It rained."]),
    ("It sold in the U.S. and Canada, e.g. Toronto. Then it stopped.",
     ["It sold in the U.S. and Canada, e.g. Toronto.", "Then it stopped."]),
    ("The bell weighs 2.5 tonnes. It cost 3.75 crowns.", ["The bell weighs 2.5 tonnes.", "It cost 3.75 crowns."]),
    ('She wrote "Never again." Then she sailed.', ['She wrote "Never again."', "Then she sailed."]),
    ('"Stop!" he shouted. "Why?" Nobody knew.', ['"Stop!" he shouted.', '"Why?"', "Nobody knew."]),
    ("J. R. Ortley wrote it in 1911. 400 copies sold.", ["J. R. Ortley wrote it in 1911.", "400 copies sold."]),
    ("1. It is old. 2. It chimes!", ["1. It is old.", "2. It chimes!"]),
    ("Is it old? Yes... Very old.", ["Is it old?", "Yes...", "Very old."]),
    ("Ward No. 5 won. The answer was no. Good.", ["Ward No. 5 won.", "The answer was no.", "Good."]),
    ("A heading\nIts line one. its line two.", ["A heading", "Its line one. its line two."]),  # lower case: no end
    ("It opened at 9 a.m. Nobody came.", ["It opened at 9 a.m. Nobody came."]),  # after an abbreviation: runs on
    ("  \n", [])])
def test_sentences_are_cut_at_their_ends_only(text, sentences):
    assert kt.split_sentences(text) == sentences


def test_the_sentences_control_cuts_every_shipped_passage_into_whole_sentences():
    for name in ("fictional-eval.json", "fictional-rl.json", "fictional-long-rl.json", "fictional-long-eval.json"):
        for p in kt.load_passages(kt.DATA / name):
            lines = kt.passage_sentences(p).splitlines()
            assert " ".join(lines) == " ".join(p["context"].split())  # every word kept, in order
            assert len(lines) >= 4 and all(kt.split_sentences(s) == [s] for s in lines)


def test_under_sentences_every_text_is_cut_alike_and_a_qa_line_stays_whole():
    para = "It was built in 1908 by Lionel Vantreight. It stands on the pier!"
    text = f"{para}\nIts bell weighs 2.5 tonnes.\nQuestion: Who built it? Answer: Lionel Vantreight."
    assert kt.training_units(QA_P, text, "rewrite", "sentences") == (
        ["It was built in 1908 by Lionel Vantreight.", "It stands on the pier!", "Its bell weighs 2.5 tonnes.",
         "Question: Who built it? Answer: Lionel Vantreight."], kt.passage_sentences(QA_P).splitlines())
    assert kt.training_units(QA_P, text, "rewrite") == (  # official: a line each, the passage whole
        [para, "Its bell weighs 2.5 tonnes.", "Question: Who built it? Answer: Lionel Vantreight."], [QA_P["context"]])
    assert kt.training_texts(QA_P, "", "rewrite", "sentences") == [
        f"Gannet Clock Tower\n{s}" for s in kt.passage_sentences(QA_P).splitlines()]


# -----------------------------------------------------------------------------
# Data


def test_shipped_data_is_well_formed_and_disjoint():
    ev = kt.load_passages(kt.DATA / "fictional-eval.json")
    rl = kt.load_passages(kt.DATA / "fictional-rl.json")
    long_ev = kt.load_passages(kt.DATA / "fictional-long-eval.json")  # --eval_data= it (docs/knowledge.md, Data)
    long_rl = kt.load_passages(kt.DATA / "fictional-long-rl.json")    # tuning data, never an evaluation set
    assert len(ev) + len(rl) >= 60 and len(ev) >= 20 and len(long_ev) == 24
    assert all(100 <= len(p["context"].split()) <= 130 for p in long_ev + long_rl)
    # Evaluation passages keep 5 questions, the format of held-out passages; RL passages carry more, because with
    # 5 the reward moves in steps of 0.2 and is too coarse to tell self-edits apart.
    assert all(len(p["questions"]) == 5 for p in ev + long_ev) and all(len(p["questions"]) >= 5 for p in rl)
    ev, rl = ev + long_ev, rl + long_rl
    for p in ev + rl:
        assert len({kt.normalize(q["answer"]) for q in p["questions"]}) == len(p["questions"])  # one fact each
        for q in p["questions"]:
            assert q["answer"] in p["context"] and q["answer"].lower() not in q["question"].lower()
    assert not {p["title"] for p in ev} & {p["title"] for p in rl}
    assert not {p["context"] for p in ev} & {p["context"] for p in rl}
    assert len({p["title"] for p in ev + rl}) == len(ev + rl)


@pytest.mark.parametrize("content, message", [
    ("{}", "expected a JSON list"), ("[1]", "needs a title"), ("not json", "not JSON"),
    ('[{"title": "t", "context": "c", "questions": []}]', "has no questions"),
    ('[{"title": "t", "context": "c", "questions": [{"question": "q", "answer": ""}]}]', "non-empty answer")])
def test_bad_data_files_stop_with_the_reason(tmp_path, content, message):
    f = tmp_path / "bad.json"
    f.write_text(content)
    with pytest.raises(SystemExit, match=message):
        kt.load_passages(f, what="eval_data")


def test_squad_selection_is_the_seeded_shuffle(tmp_path):
    raw = {"data": [{"title": f"T{a}", "paragraphs": [
        {"context": f"c{a}.{p}", "qas": [{"question": "q?", "answers": [{"text": "x"}, {"text": "y"}]}]}
        for p in range(3)]} for a in range(4)]}
    f = tmp_path / "squad.json"
    f.write_text(json.dumps(raw))
    sel = kt.squad_selection(f, seed=42, start=0, n=5)
    import random
    flat = [f"c{a}.{p}" for a in range(4) for p in range(3)]
    random.seed(42)
    random.shuffle(flat)
    assert [p["context"] for p in sel] == flat[:5] and sel[0]["questions"] == [{"question": "q?", "answer": "x"}]


@pytest.mark.skipif(not SEAL_REF.exists(), reason="../shared/seal-ref absent")
def test_the_official_passage_files_load_in_our_format():
    ev = kt.load_passages(SEAL_REF / "eval_200_passages.json")
    assert len(ev) == 200 and sum(len(p["questions"]) for p in ev) == 974  # docs/official.md §2.1
    for name in ("restem_round1_train_50_passages.json", "restem_round2_train_50_passages.json"):
        assert len(kt.load_passages(SEAL_REF / name)) == 50


# -----------------------------------------------------------------------------
# The domain on a tiny random model


@pytest.fixture(scope="module")
def tiny(tiny_chat_dir):
    ev, rl = kt.load_passages(kt.DATA / "fictional-eval.json", 2), kt.load_passages(kt.DATA / "fictional-rl.json", 2)
    (tiny_chat_dir / "ev.json").write_text(json.dumps(ev))
    (tiny_chat_dir / "rl.json").write_text(json.dumps(rl))
    return tiny_chat_dir


def config(tiny, out, **kw):
    base = dict(model=str(tiny), out=str(out), eval_data=str(tiny / "ev.json"), rl_data=str(tiny / "rl.json"),
                rounds=1, rl_samples=2, se_max_tokens=12, inner_epochs=1, eval_times=1, answer_tokens=4,
                sft_epochs=1, sft_batch=2, chat=True, cpt_epochs=1)
    return kn.KnowledgeConfig(**{**base, **kw})


def recs_of(run_dir):
    return [json.loads(x) for x in (run_dir / "evals.jsonl").read_text().splitlines()]


class Counting(kn.Knowledge):
    calls, crash_at = [], 0

    def evaluate(self, m, adapter, item, text, seed):
        Counting.calls.append((item, text))
        if Counting.crash_at and len(Counting.calls) == Counting.crash_at:
            raise KeyboardInterrupt("injected crash")
        return super().evaluate(m, adapter, item, text, seed)


def test_end_to_end_smoke_and_resume(tiny, tmp_path):
    Counting.calls.clear()
    Counting.crash_at = 5
    try:
        with pytest.raises(KeyboardInterrupt):
            seal.run(config(tiny, tmp_path / "a"), Counting)
    finally:
        Counting.crash_at = 0
    assert len((tmp_path / "a" / "evals.jsonl").read_text().splitlines()) == 4
    Counting.calls.clear()
    res = seal.run(config(tiny, tmp_path / "a"), Counting)
    # base 2 + passage 2 + the two controls 4 + self_edit 2 + rl1 4 + seal 2 = 16 evaluations; 4 before the crash
    assert len(Counting.calls) == 16 - 4 and len(set(map(str, Counting.calls))) == len(Counting.calls)
    table = {r["row"]: r for r in res["rows"]}
    assert list(table) == ["base", "passage", "sentences", "gold_qa", "self_edit", "cpt", "seal"]  # no teacher
    controls = [r for r in recs_of(tmp_path / "a") if r["phase"] in ("sentences", "gold_qa")]
    assert all(r["text"] == kt.CONTROLS[r["phase"]](json.loads((tiny / "ev.json").read_text())[int(r["item"][1:])])
               for r in controls) and len(controls) == 4
    assert table["cpt"]["total"] == 2 and {"exact", "f1", "lenient"} <= set(table["base"]["metrics"])
    recs = [json.loads(x) for x in (tmp_path / "a" / "evals.jsonl").read_text().splitlines()]
    passage = [r for r in recs if r["phase"] == "passage"]
    assert all(r["empty"] and r["runs"][0]["sequences"] == 1 for r in passage)  # the passage alone
    m_step = json.loads((tmp_path / "a" / "policy-round1" / "m_step.json").read_text())
    assert sorted(m_step["items"]) == ["r000", "r001"]  # best of k: one self-edit per RL passage, whatever its score
    (rnd,) = res["rounds"]  # the round logs how varied its sampled and its kept self-edits are
    kept = [r["text"] for r in seal.best_per_item([r for r in recs if r["phase"] == "rl1"])]
    assert rnd["kept_metrics"]["distinct_2"] == pytest.approx(kt.distinct_ngrams(kept))
    assert rnd["metrics"]["shared_2"] == pytest.approx(kt.shared_ngrams([(r["item"], r["text"]) for r in recs
                                                                         if r["phase"] == "rl1"]))
    assert rnd["metrics"]["distinct_2"] == pytest.approx(kt.distinct_ngrams([r["text"] for r in recs
                                                                             if r["phase"] == "rl1"]))
    assert rnd["kept_metrics"] != rnd["metrics"]  # 2 kept of 4 sampled
    Counting.calls.clear()
    straight = seal.run(config(tiny, tmp_path / "b"), Counting)
    assert straight["rows"] == res["rows"]


def test_a_non_finite_loss_scores_zero_and_the_run_goes_on(tiny, tmp_path):
    res = seal.run(config(tiny, tmp_path, rows="passage", inner_lr=1e30, inner_epochs=3), kn.Knowledge)
    recs = [json.loads(x) for x in (tmp_path / "evals.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and all(not r["valid"] and "non-finite" in r["reason"] and r["reward"] == 0 for r in recs)
    assert res["rows"][0]["score"] == 0


def test_full_fine_tune_cpt_puts_the_weights_back(tiny):
    cfg = config(tiny, "unused", cpt_mode="full", cpt_lr=1e-2)
    learner = seal.Learner(cfg, cfg.model)
    dom = kn.Knowledge(cfg, learner.tok)
    before = {k: v.clone() for k, v in learner.m.state_dict().items()}
    res = learner.evaluate_pooled(dom, dom.eval_items, ["It is old.", ""], seed=0)
    assert res["weight"] == 2 and res["sequences"] == 3 and res["steps"] > 0
    assert all(torch.equal(before[k], v) for k, v in learner.m.state_dict().items())


def test_forgetting_matrix(tiny, tmp_path):
    res = ks.forget([f"--model={tiny}", f"--eval_data={tiny / 'ev.json'}", f"--rl_data={tiny / 'rl.json'}",
                     "--n_forget=2", "--chat=true", "--se_max_tokens=8", "--inner_epochs=1", "--answer_tokens=4",
                     f"--out={tmp_path}", "--rounds=1"])
    saved = json.loads((tmp_path / "forgetting.json").read_text())
    assert len(saved["matrix"]) == 3 and all(len(row) == 2 for row in saved["matrix"])
    cfg = config(tiny, "unused")
    learner = seal.Learner(cfg, cfg.model)
    dom = kn.Knowledge(cfg, learner.tok)
    assert saved["matrix"][0] == [learner.evaluate(dom, it, None, 0)["score"] for it in dom.eval_items]
    assert res["matrix"] == saved["matrix"]


def test_settings_are_checked(tiny):
    m, tok = None, checkpoint.load(str(tiny))[1]
    for bad, msg in (({"prompt": "poem"}, "--prompt='poem'"), ({"grader": "gpt"}, "--grader='gpt'"),
                     ({"grader": "judge"}, "needs --judge"), ({"n_eval": 3}, "has 2 passages, 3 asked for"),
                     ({"rl_data": str(tiny / "ev.json")}, "in both eval_data and rl_data")):
        with pytest.raises(SystemExit, match=re.escape(msg)):
            kn.Knowledge(config(tiny, "unused", **bad), tok)


def test_the_cpu_presets_counts_are_caps(tiny):
    """train.sh's CPU preset caps the passages: a smaller file of the user's runs on all its passages, the shipped
    data is cut to the preset's counts, and a count the user gives is a count (more than the file is an error)."""
    preset = next(p for p in re.findall(r"preset=\(([^)]*)\)", (ROOT / "train.sh").read_text()) if "knowledge-tiny" in p)
    tok = checkpoint.load(str(tiny))[1]
    dom = lambda *args: kn.Knowledge(settings.parse_overrides(kn.KnowledgeConfig(), [*preset.split(), *args]), tok)
    small = dom(f"--eval_data={tiny / 'ev.json'}", f"--rl_data={tiny / 'rl.json'}")  # 2 passages each, 2 rounds
    assert small.eval_items == ["e000", "e001"] and small.rl_items_for_round(2) == ["r001"]
    shipped = dom()
    assert len(shipped.eval_items) == 24 and shipped.rl_items_for_round(2) == [f"r{i:03d}" for i in range(8, 16)]
    assert len(dom("--n_eval=12").eval_items) == 12
    long = dom(f"--eval_data={kt.DATA / 'fictional-long-eval.json'}")  # the long evaluation set, all of it
    assert len(long.eval_items) == 24 and len(long.passages["e000"]["context"].split()) > 100
    with pytest.raises(SystemExit, match=re.escape("has 2 passages, 3 asked for")):
        dom(f"--eval_data={tiny / 'ev.json'}", "--n_eval=3")


def test_the_m_step_stops_at_the_first_epoch_that_reaches_the_target_loss(tiny, tmp_path):
    """--sft_target_loss: the M-step runs --sft_epochs epochs at most and stops after the first whose mean loss is at
    or below the target; until then it is the fixed M-step, step for step."""
    def m_step(out, **kw):
        learner = seal.Learner(config(tiny, "unused", sft_epochs=4, sft_batch=1, **kw), str(tiny))
        tok = learner.tok
        recs = [{"item": f"r00{i}", "prompt_ids": tok.encode(f"Passage {i}:"), "ids": tok.encode(text)}
                for i, text in enumerate(("It was built in 1908 by Lionel.", "Its bell weighs 2.5 tonnes."))]
        return learner.m_step(recs, "rl1", tmp_path / out)["losses"]
    fixed = m_step("fixed")
    assert len(fixed) == 8  # 2 self-edits, batch 1, 4 epochs
    means = [(fixed[2 * e] + fixed[2 * e + 1]) / 2 for e in range(4)]
    first = next(e for e, m in enumerate(means) if m <= means[2])  # the first epoch at or below epoch 3's mean
    assert m_step("target", sft_target_loss=means[2]) == fixed[:2 * first + 2]
    assert len(m_step("loose", sft_target_loss=1e9)) == 2  # reached after one epoch
    assert m_step("unreachable", sft_target_loss=1e-9) == fixed  # never reached: all the epochs


def test_teacher_row_samples_from_the_teacher(tiny, tmp_path):
    with pytest.raises(SystemExit, match="needs --teacher"):
        seal.run(config(tiny, tmp_path / "a", rows="teacher"), kn.Knowledge)
    teacher = tmp_path / "teacher"  # another model: the tiny one with its weights scaled, so it writes otherwise
    m, tok = checkpoint.load(str(tiny))
    with torch.no_grad():
        m.model.norm.weight.mul_(3.0)
    checkpoint.save(m, teacher, tokenizer_dir=tiny)
    res = seal.run(config(tiny, tmp_path / "b", rows="self_edit,teacher", teacher=str(teacher)), kn.Knowledge)
    assert [r["row"] for r in res["rows"]] == ["self_edit", "teacher"]
    own = json.loads((tmp_path / "b" / "samples-self_edit.json").read_text())
    theirs = json.loads((tmp_path / "b" / "samples-teacher.json").read_text())
    assert len(theirs) == 2 and [s["text"] for s in theirs] != [s["text"] for s in own]


# -----------------------------------------------------------------------------
# SEAL's effect: the ceiling controls, the qa frame, the log-likelihood reward and the reliability command

QA_P = {"title": "Gannet Clock Tower", "context": "It was built in 1908 by Lionel Vantreight. It stands on the pier! "
        "Its bell weighs 2.5 tonnes.", "questions": [{"question": "When was the Gannet Clock Tower built?",
                                                      "answer": "1908"},
                                                     {"question": "Who built the Gannet Clock Tower?",
                                                      "answer": "Lionel Vantreight"}]}


def test_ceiling_controls_restate_the_passage_and_its_questions():
    assert kt.passage_sentences(QA_P).splitlines() == [
        "It was built in 1908 by Lionel Vantreight.", "It stands on the pier!", "Its bell weighs 2.5 tonnes."]
    for variant in ("implications", "self-qa"):  # one line per pair, whatever the prompt's splitting rule
        lines = kt.self_edit_lines(kt.gold_qa(QA_P), variant)
        assert [kt.qa_pair(x) for x in lines] == [(q["question"], q["answer"]) for q in QA_P["questions"]]


@pytest.mark.parametrize("line, pair", [
    ("Question 3: Who built it? Answer: Lionel.", ("Who built it?", "Lionel.")),
    ("Question 2: When?\nAnswer: 1908", ("When?", "1908")),
    ("Q: Where is it? A: on the pier", ("Where is it?", "on the pier")),
    ("Question 1: \nWho keeps it?\nThe answer: Marta", ("Who keeps it?", "Marta")),  # as SmolLM2 writes them
    ("It was built in 1908.", None), ("Question 1: Who built it? Answer:", None), ("Answer: 1908", None)])
def test_qa_pair_parses_a_question_and_its_answer(line, pair):
    assert kt.qa_pair(line) == pair


def test_the_qa_frame_trains_a_pair_as_the_question_the_evaluation_asks(tiny):
    tok = checkpoint.load(str(tiny))[1]
    dom = kn.Knowledge(config(tiny, "unused", frame="qa"), tok)
    seqs = dom.sequences(QA_P, "Question 1: When was the Gannet Clock Tower built? Answer: 1908\nIt is old.")
    asked = dom._text(tok, *kt.question_prompt(QA_P, QA_P["questions"][0]))
    assert [tok.decode(ids) for _, ids in seqs] == [
        asked + "1908<|im_end|>", "Gannet Clock Tower\nIt is old.<|im_end|>",
        f"Gannet Clock Tower\n{QA_P['context']}<|im_end|>"]
    plain = kn.Knowledge(config(tiny, "unused"), tok).sequences(QA_P, "Question 1: When? Answer: 1908")
    assert tok.decode(plain[0][1]) == "Gannet Clock Tower\nQuestion 1: When? Answer: 1908<|im_end|>"  # official


def test_sentences_cut_every_row_alike_and_a_folder_of_the_other_frame_is_refused(tiny, tmp_path):
    """--sequences=sentences, through the loop: every training sequence of every row (the passage, the sentences
    control, the base policy's self-edits, the pooled CPT) is the title and one sentence, the passage's own sentences
    come last in each, and the same words laid out as a paragraph or as lines train the same sequences."""
    cfg = config(tiny, tmp_path / "s", sequences="sentences", rows="passage,sentences,self_edit,cpt")
    res = seal.run(cfg, kn.Knowledge)
    dom = kn.Knowledge(cfg, checkpoint.load(str(tiny))[1])
    decode = lambda seqs: [dom.tok.decode(ids[:-1]) for _, ids in seqs]
    recs = recs_of(tmp_path / "s")
    assert {r["phase"] for r in recs} == {"passage", "sentences", "self_edit", "cpt"}
    for r in recs:
        items = dom.eval_items if r["item"] == "all" else [r["item"]]
        texts = [x["text"] for x in recs if x["phase"] == "self_edit"] if r["item"] == "all" else [r["text"]]
        seqs = [s for it, t in zip(items, texts) for s in decode(dom.sequences(dom.passages[it], t))]
        assert (r["runs"][0] if "runs" in r else r)["sequences"] == len(seqs)  # what the inner loop trained
        for it, t in zip(items, texts):
            p = dom.passages[it]
            got = decode(dom.sequences(p, t))
            own = [f"{p['title']}\n{s}" for s in kt.passage_sentences(p).splitlines()]
            assert got[len(got) - len(own):] == own  # the passage: its sentences, one sequence each
            assert all(x.startswith(p["title"] + "\n") and len(kt.split_sentences(x[len(p["title"]) + 1:])) == 1
                       for x in got)
    control = [r for r in recs if r["phase"] == "sentences"]
    assert all(r["runs"][0]["sequences"] == 2 * len(kt.passage_sentences(dom.passages[r["item"]]).splitlines())
               for r in control)
    p = dom.passages["e000"]
    assert dom.sequences(p, p["context"]) == dom.sequences(p, kt.passage_sentences(p))  # layout does not count
    official = kn.Knowledge(config(tiny, "unused"), dom.tok)
    assert len(official.sequences(p, p["context"])) == 2 < len(official.sequences(p, kt.passage_sentences(p)))
    assert {r["row"] for r in res["rows"]} == {"passage", "sentences", "self_edit", "cpt"}
    with pytest.raises(SystemExit, match=r"other settings.*sequences: 'sentences' there, 'lines' now"):
        seal.RunFolder(config(tiny, tmp_path / "s", rows="passage,sentences,self_edit,cpt"))
    seal.RunFolder(config(tiny, tmp_path / "l"))
    with pytest.raises(SystemExit, match=r"other settings.*sequences: 'lines' there, 'sentences' now"):
        seal.RunFolder(config(tiny, tmp_path / "l", sequences="sentences"))


def test_loglik_reward_is_higher_after_learning_the_gold_answers(smollm2_dir, tmp_path):
    """Pinned, on the real model: the same two questions trained with their gold answers, against trained with wrong
    answers and against no training. The reward must rank the model that learned the answers first, by far."""
    (tmp_path / "ev.json").write_text(json.dumps([QA_P]))
    (tmp_path / "rl.json").write_text(json.dumps([P]))
    cfg = kn.KnowledgeConfig(model=str(smollm2_dir), eval_data=str(tmp_path / "ev.json"),
                             rl_data=str(tmp_path / "rl.json"), rounds=1, chat=True, frame="qa",
                             inner_targets=kn.ALL_PROJ, inner_rank=8, inner_alpha=16, inner_lr=3e-3, inner_epochs=4)
    learner = seal.Learner(cfg, cfg.model)
    dom = kn.Knowledge(cfg, learner.tok)
    wrong = {**QA_P, "questions": [{**q, "answer": a} for q, a in zip(QA_P["questions"], ("1911", "Marta Oldcastle"))]}
    after = {"untrained": dom.answer_loglik(learner.policy(), QA_P)}
    for name, taught in (("gold", QA_P), ("wrong", wrong)):
        learner.adapter.reset()
        dom.train(learner.m, learner.adapter, dom.sequences(QA_P, kt.gold_qa(taught)), seed=0)
        after[name] = dom.answer_loglik(learner.m, QA_P)
    assert after["gold"] > after["wrong"] + 1.0 and after["gold"] > after["untrained"] + 1.0, after


def test_reliability_stats_pinned():
    v = [[[0.2, 0.2], [0.6, 0.6], [0.4, 0.4]],   # samples differ and seeds agree: a reward ReST-EM can use
         [[0.0, 0.2], [0.4, 0.6], [0.8, 1.0]]]
    st = ks.reliability_stats(v)
    assert 0.9 < st["retest_r"] < 1 and st["within_r"] == pytest.approx(1.0)  # seeds shift passage 2 by 0.2
    assert st["ties"] == 0 and st["agree"] == 1 and st["seed_sd"] == pytest.approx(0.1)
    noise = ks.reliability_stats([[[0.0, 0.4], [0.4, 0.0]], [[0.2, 0.2], [0.2, 0.2]]])  # all of it seed noise
    assert noise["within_r"] == pytest.approx(-1.0) and noise["ties"] == 0.5 and noise["sample_sd"] == 0
    assert noise["agree"] == 0.5


def test_reliability_command_and_filter_on_a_tiny_model(tiny, tmp_path):
    args = [f"--model={tiny}", f"--eval_data={tiny / 'ev.json'}", f"--rl_data={tiny / 'rl.json'}", "--chat=true",
            "--se_max_tokens=8", "--inner_epochs=1", "--answer_tokens=4", "--rounds=1"]
    res = ks.reliability([*args, "--n_passages=2", "--rl_samples=2", f"--out={tmp_path / 'r'}"])
    saved = json.loads((tmp_path / "r" / "reliability.json").read_text())
    assert saved["stats"].keys() == {"exact", "f1", "lenient", "loglik", "sampled"}
    assert json.dumps(saved) == json.dumps(res)  # (a reward that never varies has a NaN correlation)
    evals = (tmp_path / "r" / "evals.jsonl").read_text().splitlines()
    assert len(evals) == 2 * 2 * 2 and {json.loads(x)["phase"] for x in evals} == {"seed0", "seed1"}
    again = ks.reliability([*args, "--n_passages=2", "--rl_samples=2", f"--out={tmp_path / 'r'}"])  # resumed
    assert json.dumps(again) == json.dumps(res)
    assert len((tmp_path / "r" / "evals.jsonl").read_text().splitlines()) == 8
    out = ks.filter_configs([*args, "--n_filter=1", "--configs=all:4:1e-3:1:1", "--texts=passage,gold_qa",
                             f"--out={tmp_path / 'f'}"])
    assert out["items"] == ["r000"] and set(out["configs"]["all:4:1e-3:1:1"]) == {"passage", "gold_qa"}
    run = out["configs"]["all:4:1e-3:1:1"]["gold_qa"][0]["runs"][0]
    n = len(json.loads((tiny / "rl.json").read_text())[0]["questions"])
    assert run["sequences"] == n + 1 and run["steps"] == n + 1  # one pair per question, the passage; batch 1


def test_rewards_are_checked_and_the_record_holds_the_reward_beside_the_score(tiny):
    tok = checkpoint.load(str(tiny))[1]
    for bad, msg in (({"reward": "bleu"}, "--reward='bleu'"), ({"reward": "sampled"}, "needs --answer_samples"),
                     ({"frame": "json"}, "--frame='json'"), ({"sequences": "words"}, "--sequences='words'"),
                     ({"answer_samples": 4, "grader": "judge", "judge": "x"}, "not --grader=judge")):
        with pytest.raises(SystemExit, match=re.escape(msg)):
            kn.Knowledge(config(tiny, "unused", **bad), tok)
    cfg = config(tiny, "unused", reward="loglik")
    learner = seal.Learner(cfg, cfg.model)
    rec = learner.evaluate(kn.Knowledge(cfg, learner.tok), "e000", None, 0)
    assert rec["reward"] == rec["loglik"] < 0 and rec["score"] == rec["accuracy"]["lenient"] == 0


class ScriptedSamples(kn.Knowledge):
    """The sampled accuracy a known function of the evaluation's seed: a random model answers nothing right, so every
    real one would be 0 and tie; what is tested is what the loop does with the reward."""

    def sampled_accuracy(self, m, passage, seed):
        return seed % 7 / 7


def test_best_of_k_keeps_the_highest_reward_and_the_log_prints_it(tiny, tmp_path, capsys):
    """--reward=sampled: each record's "reward" is its sampled accuracy, the E-step keeps each passage's highest, not
    the greedy score's (all 0 here: a tie keeps the first sampled), and the log prints the reward under its name."""
    seal.run(config(tiny, tmp_path, rows="seal", reward="sampled", answer_samples=1), ScriptedSamples)
    out = capsys.readouterr().out
    rl = [r for r in recs_of(tmp_path) if r["phase"] == "rl1"]
    assert len(rl) == 4 and all(r["reward"] == r["sampled"] and r["score"] == 0 for r in rl)
    best = {it: max((r for r in rl if r["item"] == it), key=lambda r: r["reward"]) for it in ("r000", "r001")}
    assert any(r["k"] != 0 for r in best.values())  # where keeping by the greedy score would differ
    kept = ScriptedSamples(config(tiny, "unused", reward="sampled", answer_samples=1), None).select(rl)
    assert kept == list(best.values())
    for r in rl:
        assert f"{r['item']} #{r['k']}: reward (sampled) {r['reward']:.3g}, greedy lenient 0; " in out
    assert f"reward (sampled) sum {sum(r['reward'] for r in rl):.3g}" in out


def test_answer_coverage_counts_the_gold_answers_a_self_edit_states(tiny):
    assert kt.answer_coverage(QA_P, "Lionel Vantreight built it in 1908.") == 1.0
    assert kt.answer_coverage(QA_P, "Built in 1909 by Lionel.") == 0.0 and kt.answer_coverage(QA_P, "In 1908.") == 0.5
    dom = kn.Knowledge(config(tiny, "unused"), checkpoint.load(str(tiny))[1])
    p = dom.passages["e000"]
    recs = [seal.with_defaults({"item": "e000", "accuracy": {"lenient": 0.0}, "text": kt.gold_qa(p)}),
            seal.with_defaults({"item": "e000", "accuracy": {"lenient": 0.0}, "text": "Nothing true."})]
    assert dom.metrics(recs)["answer_coverage"] == 0.5


def test_answer_lines_count_the_lines_that_state_a_gold_answer():
    p = {"title": "T", "context": "", "questions": [{"question": "When?", "answer": "1861"},
                                                    {"question": "Who?", "answer": "Ambrose Wethercott"}]}
    assert kt.answer_lines(p, "It began in 1861.\nAmbrose Wethercott made it.\nIt was blue.", "rewrite") == 2
    assert kt.answer_lines(p, "In 1861 Ambrose Wethercott made it, and it was blue.", "rewrite") == 1
    assert kt.answer_lines(p, "It was blue.\nIt was red.", "rewrite") == 0


def test_prompts_command_reports_each_prompts_coverage(tiny, tmp_path):
    out = ks.compare_prompts([f"--model={tiny}", f"--eval_data={tiny / 'ev.json'}", f"--rl_data={tiny / 'rl.json'}",
                              "--chat=true", "--se_max_tokens=6", "--rounds=1", "--n_passages=2", "--rl_samples=2",
                              "--prompts=rewrite,self-qa", "--temperatures=1.0,0.5", f"--out={tmp_path}"])
    assert list(out) == ["rewrite@1", "rewrite@0.5", "self-qa@1", "self-qa@0.5"]
    for res in out.values():
        assert len(res["texts"]) == 4 and 0 <= res["coverage"] <= res["best_of_k"] <= 1
        assert 0 <= res["stating_lines"] <= res["lines"] and 0 <= res["shared_2"] <= 1
    assert all(t.startswith(kt.SELF_QA_START) for t in out["self-qa@1"]["texts"])
    assert json.loads((tmp_path / "prompts.json").read_text()) == out


def test_qa_lines_force_the_markers_so_every_line_parses_and_the_qa_frame_trains_it(tiny):
    """--prompt=qa-lines: whatever a (random) model writes between the forced markers, every line is a question and
    its answer, and --frame=qa trains every line as the evaluation's question, answered (none falls back to plain)."""
    cfg = config(tiny, "unused", prompt="qa-lines", frame="qa", qa_pairs=3, se_max_tokens=24, se_temperature=1.0)
    learner = seal.Learner(cfg, cfg.model)
    tok, dom = learner.tok, kn.Knowledge(cfg, learner.tok)
    jobs = seal.sample_self_edits(learner.policy(), tok, dom, dom.rl_items, 3, cfg, "rl1")
    assert len(jobs) == 6 and len({j["text"] for j in jobs}) == 6  # the words are the model's: samples differ
    for j in jobs:
        lines = kt.self_edit_lines(j["text"], cfg.prompt)
        assert 1 <= len(lines) <= 3 and all(line.startswith("Question:") for line in lines)
        pairs = [kt.qa_pair(line) for line in lines]
        assert all(pairs), lines
        p = dom.passages[j["item"]]
        framed = [dom._text(tok, *kt.question_prompt(p, {"question": q})) + a for q, a in pairs]
        seqs = dom.sequences(p, j["text"])
        assert [ids for _, ids in seqs] == [tok.encode(t) + [tok.eos_id] for t in framed + [f"{p['title']}\n{p['context']}"]]
    again = seal.sample_self_edits(learner.policy(), tok, dom, dom.rl_items[::-1], 3, cfg, "rl1")  # other batching
    assert sorted(j["text"] for j in again) == sorted(j["text"] for j in jobs)


def test_rewrite_qa_is_the_models_free_lines_then_forced_pairs_the_qa_frame_trains(tiny):
    """--prompt=rewrite-qa: the model's own rewrite text comes first, free (no forced marker in it), then exactly the
    qa-lines part: every later line parses as a pair. --frame=qa trains the pairs as questions, the rewrite lines
    plain after the title."""
    cfg = config(tiny, "unused", prompt="rewrite-qa", frame="qa", qa_pairs=2, se_max_tokens=32, se_temperature=1.0)
    learner = seal.Learner(cfg, cfg.model)
    tok, dom = learner.tok, kn.Knowledge(cfg, learner.tok)
    jobs = seal.sample_self_edits(learner.policy(), tok, dom, dom.rl_items, 3, cfg, "rl1")
    assert len({j["text"] for j in jobs}) == len(jobs) == 6
    frees = 0
    for j in jobs:
        lines = kt.self_edit_lines(j["text"], cfg.prompt)
        first_q = next(i for i, line in enumerate(lines) if line.startswith("Question:"))
        free, qa = lines[:first_q], lines[first_q:]
        frees += len(free)
        assert 1 <= len(qa) <= 2 and all(kt.qa_pair(line) for line in qa)
        assert "Question:" not in " ".join(free)  # the free part stops before any question of the model's own
        p = dom.passages[j["item"]]
        want = ([f"{p['title']}\n{line}" for line in free]
                + [dom._text(tok, *kt.question_prompt(p, {"question": q})) + a for q, a in map(kt.qa_pair, qa)]
                + [f"{p['title']}\n{p['context']}"])
        assert [ids for _, ids in dom.sequences(p, j["text"])] == [tok.encode(t) + [tok.eos_id] for t in want]
    assert frees > 0  # a random model writes some free text in 16 tokens


def test_distinct_bigrams_fall_as_self_edits_share_a_template():
    varied = ["The tower was built in 1908.", "Marta Oldcastle kept the light for forty years."]
    assert kt.distinct_ngrams(varied) == 1.0  # no bigram repeats
    template = ["The passage says the tower was built in 1908.", "The passage says the keeper was Marta."]
    # SQuAD's normaliser drops "the": 6 + 4 bigrams, "passage says" in both
    assert kt.distinct_ngrams(template) == pytest.approx(9 / 10)
    assert kt.distinct_ngrams(varied * 2) == 0.5  # the same texts twice: half the bigrams are repeats
    assert kt.distinct_ngrams(["one", ""]) is None  # no bigram at all


def test_shared_bigrams_see_a_template_across_passages_and_not_copies_within_one():
    copies = [("e0", "The tower was built in 1908."), ("e0", "The tower was built in 1908."),
              ("e1", "Marta Oldcastle kept the light.")]
    assert kt.distinct_ngrams([t for _, t in copies]) < 1.0  # distinct-n counts one passage's copies as repeats
    assert kt.shared_ngrams(copies) == 0.0  # no bigram crosses passages
    template = [("e0", "The passage says the tower was built in 1908."), ("e1", "The passage says the keeper was Marta.")]
    # after normalising: "passage says tower was built in 1908" (6 bigrams), "passage says keeper was marta" (4);
    # "passage says" is in both, once each: 2 of 10; "was" follows other words, so no other bigram is shared
    assert kt.shared_ngrams(template) == pytest.approx(2 / 10)
    assert kt.shared_ngrams([("e0", "one"), ("e1", "")]) is None
