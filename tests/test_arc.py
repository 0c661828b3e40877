"""ARC: the TTT toolkit (domains/arc_ttt.py: transforms, grid text, TTT data, eval queries, voting) and the self-edit
schema, prompt and parser (domains/arc.py). CPU, fast."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from domains import arc as se  # noqa: E402
from domains import arc_ttt as arc  # noqa: E402

NONE = dict(basic=False, size=False, chain=False, repeat=False)
BASIC = {**NONE, "basic": True}
ALL = {k: True for k in NONE}
G = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.uint8)   # small, asymmetric, non-square


@pytest.fixture(scope="module")
def tasks():
    split = arc.paper_split()
    return arc.load_tasks(split["rl"] + split["eval"])


def random_grid(rng, max_side=30):
    return rng.randint(0, 10, size=(rng.randint(1, max_side + 1), rng.randint(1, max_side + 1))).astype(np.uint8)


def digest(task_list):
    return hashlib.sha256(repr([arc._key(t) for t in task_list]).encode()).hexdigest()


# -----------------------------------------------------------------------------
# Loading and the official split


def test_load_tasks_and_paper_split(tasks):
    split = arc.paper_split()
    sizes = {k: len(split[k]) for k in ("rl", "rl_trained", "rl_scored", "eval", "eval_scored")}
    assert sizes == {"rl": 12, "rl_trained": 11, "rl_scored": 10, "eval": 10, "eval_scored": 8}
    assert set(split["rl_scored"]) <= set(split["rl_trained"]) <= set(split["rl"])
    assert set(split["eval_scored"]) <= set(split["eval"]) and "5bd6f4ac" not in split["rl_scored"]
    assert "ce8d95cc" in split["eval_scored"] and "ce8d95cc" in split["note"]
    t = tasks["44f52bb0"]
    assert len(t.train) == 6 and len(t.test) == 2 and t.train[0][0].dtype == np.uint8
    assert len(tasks["b1fc8b8e"].test) == 2
    with pytest.raises(KeyError, match="nope1234"):
        arc.load_tasks(["6150a2bd", "nope1234"])


SEAL_REF = ROOT.parent / "shared" / "seal-ref"  # the official run's files, beside the project where they exist


@pytest.mark.skipif(not (SEAL_REF / "arc" / "task_ids.json").exists(), reason="../shared/seal-ref absent")
def test_paper_split_matches_reference_ids():
    ref = json.loads((SEAL_REF / "arc" / "task_ids.json").read_text())
    split = arc.paper_split()
    base = lambda subtasks: list(dict.fromkeys(s.split("-")[0] for s in subtasks))
    assert split["rl"] == ref["train_task_ids_in_file"] and split["eval"] == ref["eval_task_ids_in_file"]
    assert split["rl_trained"] == ref["train_ids_that_get_self_edits_with_n_tasks_12"]
    assert split["rl_scored"] == base(ref["train_subtasks_scored_num_examples_11_seed0"])
    assert split["eval_scored"] == base(ref["eval_subtasks_scored_num_examples_9_seed0"])


# -----------------------------------------------------------------------------
# Transforms and augmenters


def test_inverse_restores_every_grid():
    rng = np.random.RandomState(0)
    assert set(arc.EVAL_TRANSFORMS) <= set(arc.INVERSE)
    for _ in range(300):
        g = random_grid(rng)
        for name, inv in arc.INVERSE.items():
            assert np.array_equal(arc.transform(inv, arc.transform(name, g)), g), name


def test_geometric_transforms_on_hand_grid():
    expect = {"Transpose()": [[1, 4], [2, 5], [3, 6]], "Flip(0)": [[4, 5, 6], [1, 2, 3]],
              "Flip(1)": [[3, 2, 1], [6, 5, 4]], "Rotate(90)": [[3, 6], [2, 5], [1, 4]],
              "Rotate(180)": [[6, 5, 4], [3, 2, 1]], "Rotate(270)": [[4, 1], [5, 2], [6, 3]]}
    for name, want in expect.items():
        assert arc.transform(name, G).tolist() == want, name


def test_augmenter_groups_and_outputs():
    names = [a.name for a in arc.AUGMENTERS]
    assert len(names) == 23 and len(set(names)) == 23
    assert [sum(a.group == g for a in arc.AUGMENTERS) for g in arc.AUG_GROUPS] == [11, 3, 6, 3]
    assert [len(arc.get_augmenters({**NONE, g: True})) for g in arc.AUG_GROUPS] == [11, 3, 6, 3]
    assert arc.get_augmenters(NONE) == [] and len(arc.get_augmenters(ALL)) == 23
    with pytest.raises(ValueError):
        arc.get_augmenters({"basics": True})
    rng = np.random.RandomState(0)
    out = {a.name: a.make(rng)(G).tolist() for a in arc.AUGMENTERS if a.name != "RandomTranslateXY()"}
    assert out["Reflect(0, reverse=False)"] == [[1, 2, 3], [4, 5, 6], [4, 5, 6], [1, 2, 3]]
    assert out["Reflect(0, reverse=True)"] == [[4, 5, 6], [1, 2, 3], [1, 2, 3], [4, 5, 6]]
    assert out["Reflect(1, reverse=False)"] == [[1, 2, 3, 3, 2, 1], [4, 5, 6, 6, 5, 4]]
    assert out["Reflect(1, reverse=True)"] == [[3, 2, 1, 1, 2, 3], [6, 5, 4, 4, 5, 6]]
    assert out["IncreaseResolution(2)"] == [[1, 1, 2, 2, 3, 3]] * 2 + [[4, 4, 5, 5, 6, 6]] * 2
    assert out["IncreaseHeight(2)"] == [[1, 2, 3], [1, 2, 3], [4, 5, 6], [4, 5, 6]]
    assert out["IncreaseWidth(2)"] == [[1, 1, 2, 2, 3, 3], [4, 4, 5, 5, 6, 6]]
    assert out["Chain([Rotate(90), IncreaseResolution(2)])"] == [[3, 3, 6, 6]] * 2 + [[2, 2, 5, 5]] * 2 + [[1, 1, 4, 4]] * 2
    assert out["Repeat(0, 2)"] == [[1, 2, 3], [4, 5, 6], [1, 2, 3], [4, 5, 6]]
    assert out["Repeat(1, 2)"] == [[1, 2, 3, 1, 2, 3], [4, 5, 6, 4, 5, 6]]
    assert out["Repeat(2, 2)"] == [[1, 2, 3, 1, 2, 3], [4, 5, 6, 4, 5, 6]] * 2


def test_translate_uses_one_shift_per_task():
    translate = next(a for a in arc.AUGMENTERS if a.name == "RandomTranslateXY()")
    big = np.arange(64, dtype=np.uint8).reshape(8, 8) % 10
    task = arc.Task("t", [(big, big.copy())], [(big.copy(), big.copy())])
    shifts = set()
    for seed in range(20):
        t2 = arc.map_task(task, translate.make(np.random.RandomState(seed)))
        grids = [g for pair in t2.train + t2.test for g in pair]
        assert all(np.array_equal(g, grids[0]) for g in grids)     # same shift for every grid of the task
        shift = next((dy, dx) for dy in range(4) for dx in range(4)
                     if np.array_equal(np.roll(big, (dy, dx), axis=(0, 1)), grids[0]))
        shifts.add(shift)
    assert len(shifts) > 3


def test_color_and_example_permutations():
    rng = np.random.RandomState(0)
    grids = [random_grid(rng, 6) for _ in range(6)]
    task = arc.Task("t", [(grids[0], grids[1]), (grids[2], grids[3])], [(grids[4], grids[5])])
    t2 = arc.permute_colors(task, rng)
    mapping = {}
    for a, b in zip([g for p in task.train + task.test for g in p], [g for p in t2.train + t2.test for g in p]):
        for x, y in zip(a.ravel(), b.ravel()):
            assert mapping.setdefault(int(x), int(y)) == int(y)      # one consistent map for the whole task
    assert mapping.get(0, 0) == 0 and len(set(mapping.values())) == len(mapping)
    t3 = arc.permute_examples(task, np.random.RandomState(3))
    assert sorted(arc._key(arc.Task("", [p], [])) for p in t3.train) == sorted(arc._key(arc.Task("", [p], [])) for p in task.train)


# -----------------------------------------------------------------------------
# Grid text and messages


def test_grid_text_formats_and_round_trip():
    g = np.array([[3, 3, 8], [3, 7, 0], [5, 0, 0]])
    assert arc.grid_to_text(g, "numpy") == "[[3 3 8]\n [3 7 0]\n [5 0 0]]"
    assert arc.grid_to_text(g, "compact") == "338\n370\n500"
    assert arc.example_text(g, g[:1], "numpy") == "[[3 3 8]\n [3 7 0]\n [5 0 0]] -> [[3 3 8]]#"
    assert arc.example_text(g, g[:1], "compact") == "338\n370\n500 -> 338#"
    rng = np.random.RandomState(1)
    for _ in range(200):
        g = random_grid(rng)
        assert arc.grid_to_text(g, "numpy") == str(g)                # the official str(np.array) format
        for fmt in arc.FORMATS:
            back = arc.text_to_grid(arc.grid_to_text(g, fmt), fmt)
            assert back is not None and back.dtype == np.uint8 and np.array_equal(back, g)
    assert np.array_equal(arc.parse_answer("[[1 2]\n [3 4]]#<|eot_id|> junk", "numpy"), [[1, 2], [3, 4]])
    assert np.array_equal(arc.parse_answer(" 12\n34 ", "compact"), [[1, 2], [3, 4]])
    with pytest.raises(ValueError):
        arc.grid_to_text(g, "json")


@pytest.mark.parametrize("fmt", arc.FORMATS)
def test_text_to_grid_rejects_malformed(fmt):
    bad = ["", " ", "[]", "[[]]", "[[1 2]\n [3]]", "[[1 2]\n [3 a]]", "[[1, 2]]", "[[10 2]]", "[1 2]",
           "[[[1]]]", "[[1 2]] x", "x [[1 2]]", "([1 2])", "x[1 2]x", "[[1 2]\n\n [3 4]] ]", "[[-1 2]]", "12\n3", "1a\n23", "1 2\n3 4",
           "12\n\n34", "\u0661\u0662", "[[\u0661 2]]", None, 12, b"12"]
    for s in bad:
        assert arc.text_to_grid(s, fmt) is None, repr(s)
    rng = np.random.RandomState(2)
    alphabet = list("[] 0123456789\n#,-x") + ["\u0663", "\x00"]
    for _ in range(2000):                       # random junk never raises, and anything accepted is a grid
        s = "".join(rng.choice(alphabet, size=rng.randint(0, 30)))
        g = arc.text_to_grid(s, fmt)
        assert g is None or (g.ndim == 2 and g.size > 0 and g.max() <= 9)


def test_task_messages_layout():
    demos = [(G, G.T), (G[:1], G[:1, :1])]
    for fmt in arc.FORMATS:
        system, user = arc.task_messages(demos, G[::-1], fmt)
        assert system["role"] == "system" and user["role"] == "user"
        assert system["content"].endswith(arc.example_text(G, G.T, fmt) + "\n" + arc.example_text(G[:1], G[:1, :1], fmt) + "\n")
        assert user["content"] == arc.grid_to_text(G[::-1], fmt) + " -> "
    assert "numpy" in arc.task_messages(demos, G, "numpy")[0]["content"]


class CharTokenizer:
    """Duck-typed tokenizer: one id per character, a fixed chat wrapper."""
    eos_id, eot_id = 1, 2

    def chat(self, messages, add_generation_prompt=True):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + ("<assistant>" if add_generation_prompt else "")

    def encode(self, s):
        return [ord(c) + 10 for c in s]


def test_ttt_examples_token_ids_and_length_filter(tasks):
    copies = arc.ttt_tasks(tasks["6150a2bd"], NONE)
    tok = CharTokenizer()
    examples, dropped = arc.ttt_examples(copies, "numpy", tok, max_tokens=10**6)
    assert dropped == 0 and len(examples) == len(copies)
    prompt, completion = examples[0]
    q_in, q_out = copies[0].test[0]
    assert completion == tok.encode(arc.answer_text(q_out, "numpy")) + [tok.eot_id]
    assert prompt == tok.encode(tok.chat(arc.task_messages(copies[0].train, q_in, "numpy")))
    lengths = sorted(len(p) + len(c) for p, c in examples)
    kept, dropped = arc.ttt_examples(copies, "numpy", tok, max_tokens=lengths[1])
    assert len(kept) == 2 and dropped == len(copies) - 2
    tok2 = type("T", (), {  # no eot_id: falls back to eos_id
        "eos_id": 7, "chat": CharTokenizer.chat, "encode": CharTokenizer.encode})()
    assert arc.ttt_examples(copies[:1], "compact", tok2, 10**6)[0][0][1][-1] == 7


# -----------------------------------------------------------------------------
# TTT data


def test_ttt_official_sizes(tasks):
    # Reference 1.3: without the token filter, 2-demo tasks give 4 (no aug) / 96 (basic); 3-demo 10 / ~200.
    for tid in ("5614dbcf", "66e6c45b"):
        assert len(tasks[tid].train) == 2
        assert len(arc.ttt_tasks(tasks[tid], NONE, seed=0)) == 4
        assert len(arc.ttt_tasks(tasks[tid], BASIC, seed=0)) == 96
    for tid in ("4be741c5", "8be77c9e", "68b67ca3"):
        assert len(tasks[tid].train) == 3
        assert len(arc.ttt_tasks(tasks[tid], NONE, seed=0)) == 10
        assert 180 <= len(arc.ttt_tasks(tasks[tid], BASIC, seed=0)) <= 216
    assert len(arc.ttt_tasks(tasks["67e8384a"], ALL, seed=0)) == 250


def test_ttt_structure_and_no_test_leak(tasks):
    task = tasks["8be77c9e"]
    copies = arc.ttt_tasks(task, NONE, seed=0)
    demo_keys = {arc._key(arc.Task("", [d], [])) for d in task.train}
    for t in copies:
        assert len(t.test) == 1 and len(t.train) in (1, 2)
        assert arc._key(arc.Task("", [t.test[0]], [])) in demo_keys
        assert all(arc._key(arc.Task("", [d], [])) in demo_keys for d in t.train)
    test_in = task.test[0][0].tobytes()
    for t in arc.ttt_tasks(task, ALL, seed=0, max_examples=10**6):
        assert all(g.tobytes() != test_in or g.shape != task.test[0][0].shape for p in t.train + t.test for g in p)


def test_ttt_grid_cap_and_truncation(tasks):
    task = tasks["358ba94e"]                                        # grids up to 19 wide: upscaling exceeds 30
    full = arc.ttt_tasks(task, ALL, seed=0, max_examples=10**6)
    assert all(max(g.shape) <= 30 for t in full for p in t.train + t.test for g in p)
    assert len(arc.ttt_tasks(task, ALL, seed=0, max_examples=10**6, max_grid=100)) > len(full)
    small = arc.ttt_tasks(tasks["44f52bb0"], ALL, seed=0, max_examples=17)
    assert len(small) == 17
    everything = {arc._key(t) for t in arc.ttt_tasks(tasks["44f52bb0"], ALL, seed=0, max_examples=10**6)}
    assert all(arc._key(t) in everything for t in small)
    ordered = arc.ttt_tasks(tasks["44f52bb0"], ALL, seed=0, max_examples=10**6)
    assert digest(small) != digest(ordered[:17])                    # a seeded random subset, not the head
    kept = arc.ttt_tasks(tasks["44f52bb0"], ALL, seed=0, max_examples=10**6, keep=lambda t: len(t.train) == 5)
    assert kept and all(len(t.train) == 5 for t in kept)


def test_ttt_deterministic_and_seed_dependent(tasks):
    task = tasks["6e02f1e3"]
    a, b = arc.ttt_tasks(task, ALL, seed=0), arc.ttt_tasks(task, ALL, seed=0)
    assert digest(a) == digest(b)
    assert digest(arc.ttt_tasks(task, ALL, seed=1)) != digest(a)
    code = ("import sys, hashlib; sys.path.insert(0, '.'); from domains import arc_ttt as arc; "
            "t = arc.load_tasks(['6e02f1e3'])['6e02f1e3']; "
            "print(hashlib.sha256(repr([arc._key(c) for c in arc.ttt_tasks(t, {k: True for k in arc.AUG_GROUPS}, seed=0)]).encode()).hexdigest())")
    for hashseed in ("1", "12345"):
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                             env={**os.environ, "PYTHONHASHSEED": hashseed}, check=True)
        assert out.stdout.strip() == digest(a)


# -----------------------------------------------------------------------------
# Eval queries


def test_eval_queries_three_demo_task(tasks):
    task = tasks["8be77c9e"]
    queries = arc.eval_queries(task, 0, seed=0)
    plain = [q for q in queries if q.group_name == "identity"]
    views = [q for q in queries if q.group_name != "identity"]
    assert len(queries) == 10 and len(plain) == 5                 # 3 contexts x up to 2 orders, + 5 views
    assert sorted(v.group_name for v in views) == sorted(arc.EVAL_TRANSFORMS)
    context_sets = {frozenset(arc._key(arc.Task("", [d], [])) for d in q.demos) for q in plain}
    assert len(context_sets) == 3 and all(len(q.demos) == 2 for q in queries)
    plain_keys = {arc._qkey(q) for q in plain}
    for v in views:                                                # the inverse maps each view back onto a plain query
        assert v.inverse == arc.INVERSE[v.group_name]
        back = arc.Query([(v.invert(i), v.invert(o)) for i, o in v.demos], v.invert(v.query_in), "identity", "identity")
        assert arc._qkey(back) in plain_keys
        assert np.array_equal(v.invert(v.query_in), task.test[0][0])
    assert len({arc._qkey(q) for q in queries}) == len(queries)
    assert [arc._qkey(q) for q in arc.eval_queries(task, 0, seed=0)] == [arc._qkey(q) for q in queries]


def test_eval_queries_skip_views_that_repeat_a_query():
    # Constant square grids look the same under every transform, so no view adds a new query.
    demos = [(np.full((3, 3), c, np.uint8), np.full((2, 2), c + 1, np.uint8)) for c in (1, 3, 5)]
    task = arc.Task("sym", demos, [(np.full((3, 3), 7, np.uint8), np.full((2, 2), 8, np.uint8))])
    queries = arc.eval_queries(task, 0)
    assert queries and all(q.group_name == "identity" for q in queries)


def test_eval_queries_fits_widens_leave_out(tasks):
    task = tasks["67e8384a"]                                        # 4 demos
    qs = arc.eval_queries(task, 0, fits=lambda q: len(q.demos) <= 2)
    assert qs and all(len(q.demos) == 2 for q in qs)
    assert arc.eval_queries(task, 0, fits=lambda q: False) == []
    assert len(arc.eval_queries(tasks["44f52bb0"], 1)) > 0


# -----------------------------------------------------------------------------
# Voting and pass@2


def full(v, shape=(2, 2)):
    return np.full(shape, v, dtype=np.uint8)


def test_vote_clear_majority():
    X, Y, Z = full(1), full(2), full(3, (3, 1))
    outs = [(X, "identity"), (X, "identity"), (Y, "identity"), (X, "Transpose()"), (Z, "Transpose()"),
            (X, "Flip(0)"), (None, "Flip(1)"), ("garbage", "Flip(1)")]
    attempts = arc.vote(outs)
    assert len(attempts) == 2 and np.array_equal(attempts[0], X)
    assert not np.array_equal(attempts[1], X)


def test_vote_tie_broken_by_identity_group():
    # Pooled proposals: X 5, Z 2, Y 2. Z is seen first (more raw outputs), but Y came from identity queries.
    X, Y, Z = full(1), full(2), full(3)
    outs = [(X, "identity"), (X, "identity"), (Y, "identity")] + [(g, "Flip(0)") for g in (X, X, X, Z, Z)]
    attempts = arc.vote(outs)
    assert np.array_equal(attempts[0], X) and np.array_equal(attempts[1], Y)
    pool = list(arc._top3([arc._as_key(g) for g, _ in outs]))
    assert pool[1] == arc._as_key(Z)                                # without the tie-break Z would be second


def test_vote_degenerate_cases():
    assert [a.tolist() for a in arc.vote([])] == [[[0]]]
    assert [a.tolist() for a in arc.vote([(None, "identity"), ("x", "Flip(0)"), (np.zeros((0, 3)), None)])] == [[[0]]]
    one = arc.vote([(G, "identity")])
    assert len(one) == 1 and np.array_equal(one[0], G)


def test_perfect_model_round_trip_is_solved(tasks):
    task = tasks["b1fc8b8e"]                                        # two test inputs: both must be right
    attempts = []
    for idx, (q_in, truth) in enumerate(task.test):
        outs = []
        for q in arc.eval_queries(task, idx):
            answer = arc.transform(q.group_name, truth)             # what a perfect model says for this view
            text = arc.answer_text(answer, "numpy")
            outs.append((q.invert(arc.parse_answer(text, "numpy")), q.group_name))
        attempts.append(arc.vote(outs))
    truths = [t for _, t in task.test]
    assert arc.solved(attempts, truths)
    assert not arc.solved([attempts[0], [full(0)]], truths)
    assert not arc.solved(attempts[:1], truths) and not arc.solved([], [])


# -----------------------------------------------------------------------------
# Self-edit prompt and parser

PAPER = ('{"data_generation": {"use_basic_augmentations": true, "use_size_augmentations": false, '
         '"use_chain_augmentations": false, "use_repeat_augmentations": false}, '
         '"training": {"strategy": "train_using_all_tokens", "learning_rate": 1e-5, "num_train_epochs": 3}}')


def test_self_edit_prompt(tasks):
    task = tasks["6150a2bd"]
    system, user = se.self_edit_prompt(task, "numpy", "between 1e-5 and 1e-3")
    assert system["role"] == "system" and user["role"] == "user"
    text = user["content"]
    assert text.startswith("Input:\n" + "\n".join(" ".join(map(str, r)) for r in task.train[0][0].tolist()) + "\n\nOutput:\n")
    assert "\n------\n" in text and "between 1e-5 and 1e-3" in text and se.SKELETON in text
    for key in ("use_basic_augmentations", "use_repeat_augmentations", "train_using_output_tokens", "num_train_epochs"):
        assert key in text
    test_rows = "\n".join(" ".join(map(str, r)) for r in task.test[0][0].tolist())
    assert test_rows not in text                                    # the test input is never shown
    compact = se.self_edit_prompt(task, "compact", "x")[1]["content"]
    assert "\n" + "".join(map(str, task.train[0][0][0])) + "\n" in compact


def test_parse_self_edit_valid():
    edit, reason = se.parse_self_edit(PAPER)
    assert reason == "ok" and edit == se.SelfEdit(True, False, False, False, "all", 1e-5, 3)
    assert edit.aug == {**NONE, "basic": True}
    assert se.parse_self_edit(edit.to_json())[0] == edit
    cont = PAPER[len(se.SKELETON_PREFIX):]
    assert se.parse_self_edit(se.SKELETON_PREFIX + cont + "<|eot_id|> and {more}")[0] == edit
    assert se.parse_self_edit("Sure! ```json\n" + PAPER + "\n```")[0] == edit
    e2, _ = se.parse_self_edit(PAPER.replace("train_using_all_tokens", "train_using_output_tokens")
                                .replace('"num_train_epochs": 3', '"num_train_epochs": 4.0').replace("1e-5", "1"))
    assert (e2.loss, e2.epochs, e2.lr) == ("output", 4, 1.0) and isinstance(e2.epochs, int)
    odd = PAPER.replace('"training"', '"note": "braces } { and \\" quotes", "training"')
    assert se.parse_self_edit(odd)[0] == edit


@pytest.mark.parametrize("text, reason", [
    ("", "no JSON object"),
    ("no json here", "no JSON object"),
    (PAPER[:-1], "unterminated JSON object"),
    ("{" * 5000, "JSON nested too deeply"),
    ('{"data_generation": {}', "unterminated JSON object"),
    ("{'data_generation': 1}", "invalid JSON"),
    ('{"training": {}}', "missing key data_generation"),
    ('{"data_generation": [], "training": {}}', "data_generation is not an object"),
    (PAPER.replace('"use_size_augmentations": false, ', ""), "missing key data_generation.use_size_augmentations"),
    (PAPER.replace("true", '"true"'), "data_generation.use_basic_augmentations is not true/false"),
    (PAPER.replace("true", "1"), "data_generation.use_basic_augmentations is not true/false"),
    (PAPER.replace('"learning_rate": 1e-5, ', ""), "missing key training.learning_rate"),
    (PAPER.replace("train_using_all_tokens", "all"), "unknown training.strategy"),
    (PAPER.replace("1e-5", "NaN"), "non-finite number NaN"),
    (PAPER.replace("1e-5", "-Infinity"), "non-finite number -Infinity"),
    (PAPER.replace("1e-5", "1e999"), "training.learning_rate is not finite"),
    (PAPER.replace("1e-5", "0"), "training.learning_rate 0 outside (0, 1]"),
    (PAPER.replace("1e-5", "2"), "training.learning_rate 2 outside (0, 1]"),
    (PAPER.replace("1e-5", '"1e-5"'), "training.learning_rate is not a number"),
    (PAPER.replace("1e-5", "true"), "training.learning_rate is not a number"),
    (PAPER.replace('"num_train_epochs": 3', '"num_train_epochs": 2.5'), "training.num_train_epochs is not an integer"),
    (PAPER.replace('"num_train_epochs": 3', '"num_train_epochs": 0'), "training.num_train_epochs 0 outside [1, 100]"),
    (PAPER.replace('"num_train_epochs": 3', '"num_train_epochs": ' + "9" * 400), "training.num_train_epochs is not finite"),
    (PAPER.replace('"num_train_epochs": 3', '"num_train_epochs": ' + "9" * 5000), "invalid JSON"),
    (PAPER.replace('"training"', '"data_generation": {}, "training"'), "duplicate key 'data_generation'"),
])
def test_parse_self_edit_reasons(text, reason):
    assert se.parse_self_edit(text) == (None, reason)


def test_parse_self_edit_bounds_configurable():
    assert se.parse_self_edit(PAPER, lr_range=(1e-4, 1e-3))[0] is None
    assert se.parse_self_edit(PAPER, epoch_range=(1, 2))[0] is None
    assert se.parse_self_edit(PAPER, lr_range=(0, 1e-5))[0] is not None


def test_parse_self_edit_never_raises():
    rng = np.random.RandomState(0)
    inputs = [None, 3, 3.5, [PAPER], b"\xff\xfe{", PAPER.encode(), "[" * 100000, "{" + '"a":' * 50000,
              '{"a": "' + "\\" * 10001 + '"}', "{" * 300 + "}" * 300, "x" * 1_000_000 + PAPER, "\x00" * 1000,
              "{" + ",".join(f'"k{i}": {i}' for i in range(10000)) + "}"]
    inputs += [PAPER[:i] for i in range(len(PAPER) + 1)]
    inputs += [bytes(rng.randint(0, 256, size=rng.randint(0, 200)).astype(np.uint8)).decode("utf-8", "replace")
               for _ in range(1500)]
    alphabet = list('{}[]":,.-+eE0123456789 \\ntruefalsNaIiy') + ["\u2028", "\ud800"]
    for _ in range(3000):
        s = list(PAPER)
        for _ in range(rng.randint(1, 6)):
            op, pos = rng.randint(3), rng.randint(len(s) + 1)
            if op == 0 and pos < len(s):
                del s[pos]
            elif op == 1:
                s.insert(pos, rng.choice(alphabet))
            elif pos < len(s):
                s[pos] = rng.choice(alphabet)
        inputs.append("".join(s))
    valid = 0
    for text in inputs:
        edit, reason = se.parse_self_edit(text)
        assert isinstance(reason, str) and reason and len(reason) < 120
        assert (edit is None) != (reason == "ok")
        if edit is not None:
            valid += 1
            assert isinstance(edit.epochs, int) and 0 < edit.lr <= 1 and edit.loss in ("all", "output")
    assert valid > 10                                               # some mutations stay valid (e.g. in whitespace)


def test_over_step_cap():
    assert not arc.over_step_cap(250, 3)                          # 375 steps: allowed
    assert arc.over_step_cap(250, 4)
    assert arc.over_step_cap(251, 3) is True                       # 753 // 2 = 376 steps
    assert not arc.over_step_cap(96, 7) and arc.over_step_cap(96, 8)
