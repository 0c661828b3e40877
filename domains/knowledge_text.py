"""
The knowledge domain's text toolkit (domains/knowledge.py is the SEAL domain on top of it): passages in the official
data format, the self-edit prompts, a self-edit -> its training texts, the ceiling controls, and SQuAD's answer
graders. No torch, so it can be read and tested alone.

    passages = load_passages(DATA / "fictional-eval.json")
    ask, header = self_edit_prompt(passages[0], "implications")      # what the policy is asked
    texts = training_texts(passages[0], completion, "implications")  # what the inner loop trains on
    lenient(answer, passages[0]["questions"][0]["answer"])           # 1.0 when the gold answer is stated
"""
import json
import random
import re
import string
from collections import Counter
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "data" / "knowledge"


# -----------------------------------------------------------------------------
# Data


def load_passages(path, n=None, what="data"):
    """A JSON list in the official format, checked: a bad file stops the run here with the reason."""
    p = Path(path)
    if not p.exists():
        raise SystemExit(f"--{what}={path}: no such file")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(f"--{what}={path}: not JSON ({e})") from None
    if not isinstance(data, list):
        raise SystemExit(f"--{what}={path}: expected a JSON list of passages")
    for i, d in enumerate(data):
        ok = (isinstance(d, dict) and isinstance(d.get("title"), str) and isinstance(d.get("context"), str)
              and d["context"].strip() and isinstance(d.get("questions"), list))
        if not ok:
            raise SystemExit(f"--{what}={path}: passage {i} needs a title, a non-empty context and a questions list")
        if not d["questions"]:
            raise SystemExit(f"--{what}={path}: passage {i} ({d['title']!r}) has no questions")
        for q in d["questions"]:
            if not (isinstance(q, dict) and isinstance(q.get("question"), str) and isinstance(q.get("answer"), str)
                    and q["answer"].strip()):
                raise SystemExit(f"--{what}={path}: passage {i} ({d['title']!r}): each question needs a question "
                                 f"and a non-empty answer string")
    if n is not None and n > len(data):
        raise SystemExit(f"--{what}={path} has {len(data)} passages, {n} asked for")
    return data[:n] if n is not None else data


def squad_selection(squad_file, seed=42, start=0, n=200):
    """The paper's passages from a SQuAD v1.1 file: every (title, paragraph) with its questions (first answer),
    shuffled with random.seed(seed), then [start:start+n] (docs/official.md §2.1: dev, first 200 for evaluation)."""
    raw = json.loads(Path(squad_file).read_text())["data"]
    out = [{"title": a["title"], "context": p["context"],
            "questions": [{"question": q["question"], "answer": q["answers"][0]["text"]} for q in p["qas"]]}
           for a in raw for p in a["paragraphs"]]
    random.seed(seed)
    random.shuffle(out)
    return out[start:start + n]


# -----------------------------------------------------------------------------
# Prompts (docs/official.md §2.2; the project's own words) and self-edit -> training sequences

PROMPTS = {
    "implications": ("Read the passage and list what follows from it: facts it states and conclusions you can "
                     "draw from them, one per line.", "Implications:"),
    "implications-long": ("Read the passage and list everything that follows from it, in detail: every fact it "
                          "states, restated in its own sentence, and every conclusion drawn from them, one per "
                          "line.", "Implications:"),
    "rewrite": ("Rewrite the passage in several different ways, keeping every fact, one rewrite per line.",
                "Rewrites:"),
    "self-qa": ("Write questions about the passage, each followed by its answer, covering every fact in it.",
                "Questions and answers:"),
    "qa-lines": ("Write questions about the passage, each followed by its answer, covering every fact in it, one "
                 "per line: Question: ...? Answer: ...", "Questions and answers:"),
    "rewrite-qa": ("Rewrite the passage in a few different ways, keeping every fact, one rewrite per line. Then write "
                   "questions about the passage, each followed by its answer, one per line: Question: ...? Answer: "
                   "...", "Rewrites, then questions and answers:"),
}
CONSTRAINED = ("qa-lines", "rewrite-qa")  # the prompts whose question-answer lines the sampler forces
SELF_QA_START = "Question 1: "  # a self-qa completion starts here (official)
# --prompt=qa-lines (and rewrite-qa, after the model's own free rewrite lines): the sampler forces these markers
# and the model writes everything between them (a question up to its "?", an answer up to the end of its line), so
# every line parses with qa_pair (domains/knowledge.py)
QA_MARKS = ("Question:", "? Answer:", "\n")


def self_edit_prompt(passage, variant):
    """(instruction with the passage, answer header): the plain-text prompt is their concatenation. The variant is
    --prompt, checked against PROMPTS where the settings are (Knowledge)."""
    ask, header = PROMPTS[variant]
    return f"{ask}\n\nPassage:\n{passage['title']}\n{passage['context']}", header


def self_edit_lines(text, variant):
    """The self-edit's training texts, as the official run splits them: on '---', then one per non-empty line
    (a first preamble line is dropped when the list starts on line 2 with '1.'); self-qa splits at 'Question N:'."""
    if variant == "self-qa":
        parts = re.split(r"(?=Question \d+:)", text)
        return [p.strip() for p in parts if p.strip()]
    out = []
    for chunk in text.split("---"):
        lines = [ln.strip() for ln in chunk.splitlines() if ln.strip()]
        if len(lines) > 1 and lines[1].startswith("1."):
            lines = lines[1:]
        out += lines
    return out


SEQUENCES = ("lines", "sentences")  # --sequences: what one training sequence is (training_units)


def training_units(passage, text, variant, sequences="lines"):
    """What the inner loop trains, one sequence each, before the title goes in front: (the self-edit's units, the
    passage's). "lines" (official, §2.3): each self-edit line, and the passage whole (always trained; alone for the
    'train on passage' row, where the self-edit is empty). "sentences": every text, the passage and each line alike,
    cut into its sentences, so that a text's sequences follow what it says and not how it is laid out: the passage
    as one paragraph and its sentences one per line train the same sequences. A line that is a question and its
    answer stays one unit: cut, the answer would lose its question."""
    lines = self_edit_lines(text, variant) if text else []
    if sequences == "lines":
        return lines, [passage["context"]]
    return ([u for line in lines for u in ([line] if qa_pair(line) else split_sentences(line))],
            split_sentences(passage["context"]))


def training_texts(passage, text, variant, sequences="lines"):
    """Each of training_units after the passage's title: the self-edit's, then the passage's."""
    edit, own = training_units(passage, text, variant, sequences)
    return [f"{passage['title']}\n{u}" for u in edit + own]


# A sentence's end: . ! ? (or an ellipsis), any closing quotes or brackets, then space and what can open a sentence.
# A decimal point (3.5) has no space after it, so it never matches.
SENTENCE_END = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*(?=\s+[\"'\u201c\u2018(\[]?[A-Z0-9])")
# Words whose point is no sentence's end, as they stand before a name or a number. Case matters: "no." may end a
# sentence, "No. 5" does not. Initials (J. R.) and dotted abbreviations (U.S., e.g., a.m.) are found by their shape.
ABBREVIATIONS = ("Mr", "Mrs", "Ms", "Dr", "Prof", "St", "Mt", "Sr", "Jr", "Rev", "Fr", "Capt", "Col", "Gen", "Lt",
                 "Sgt", "Gov", "Sen", "Rep", "Hon", "No", "Nos", "Vol", "Fig", "vs", "cf", "approx", "ca", "Jan",
                 "Feb", "Mar", "Apr", "Jun", "Jul", "Aug", "Sep", "Sept", "Oct", "Nov", "Dec")
NOT_AN_END = re.compile(r"(?:^|[\s(\"'\u201c])(?:[A-Z]|(?:[A-Za-z]\.)+[A-Za-z]|" + "|".join(ABBREVIATIONS) + r")$"
                        r"|^\s*\d+$")  # the last: a list's number ("1. It is old.")


def split_sentences(text):
    """The text's sentences in order, stripped; a line break always ends one (a heading, a list item). No end: the
    point of an abbreviation (Dr., e.g., U.S.: ABBREVIATIONS), of an initial (J. R. Tolkien) or of a list's number,
    a decimal point (3.5), a "!" or "?" in a quote the sentence goes on after ("Stop!" she said). A sentence that
    ends in an abbreviation runs on into the next: two sentences in one sequence, nothing lost."""
    out = []
    for line in text.splitlines():
        start = 0
        for m in SENTENCE_END.finditer(line):
            if m.group().startswith(".") and NOT_AN_END.search(line[start:m.start()]):
                continue
            out.append(line[start:m.end()].strip())
            start = m.end()
        out.append(line[start:].strip())
    return [s for s in out if s]


def passage_sentences(passage):
    """The passage's own sentences, one per line: a control self-edit that restates and invents nothing."""
    return "\n".join(split_sentences(passage["context"]))


def gold_qa(passage):
    """The passage's own questions with their gold answers, one pair per line: a control that has seen the test,
    so an upper bound on what any self-edit text can teach, never a method."""
    return "\n".join(f"Question {i}: {q['question']} Answer: {q['answer']}"
                     for i, q in enumerate(passage["questions"], 1))


CONTROLS = {"sentences": passage_sentences, "gold_qa": gold_qa}
QA_LINE = re.compile(r"^(?:Q(?:uestion)?\s*\d*\s*[:.)]\s*)?(?P<q>[^\n]*?\?)\s*(?:the\s+)?A(?:nswer)?\s*\d*\s*[:.)]\s*"
                     r"(?P<a>.*\S)", re.S | re.I)


def qa_pair(line):
    """(question, answer) when a self-edit line is a question followed by its answer ("Question 2: Who built it?
    Answer: Lionel."), else None."""
    m = QA_LINE.match(line.strip())
    return (m["q"].strip(), m["a"].strip()) if m else None


def question_prompt(passage, q):
    """The question without the passage; short answers are what the graders can check."""
    return f"Answer with a few words only.\nTopic: {passage['title']}\nQuestion: {q['question']}", "Answer:"


# -----------------------------------------------------------------------------
# Grading with no API key: SQuAD v1.1's own answer normalisation, exact match and token F1, and a lenient match


def normalize(s):
    """SQuAD's normalize_answer: lower case, no punctuation, no articles, single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def exact(pred, gold):
    return float(normalize(pred) == normalize(gold))


def f1(pred, gold):
    p, g = normalize(pred).split(), normalize(gold).split()
    same = sum((Counter(p) & Counter(g)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def lenient(pred, gold):
    """The normalised gold answer appears, as whole words, in the normalised prediction: "In 1908 it opened"
    answers "1908". Empty gold or prediction is wrong."""
    p, g = normalize(pred), normalize(gold)
    return float(bool(g) and bool(p) and f" {g} " in f" {p} ")


GRADERS = {"exact": exact, "f1": f1, "lenient": lenient}


def answer_coverage(passage, text):
    """The share of the passage's gold answers that a self-edit's text states (lenient match): a diagnostic of how
    faithfully it restates the facts asked about, computed without any training. Never a reward here."""
    return sum(lenient(text, q["answer"]) for q in passage["questions"]) / len(passage["questions"])


def answer_lines(passage, text, variant):
    """How many of a self-edit's lines state at least one gold answer: under the official frame each line is a
    training sequence, so this counts the sequences that carry a fact asked about (the sentences control has about
    one per question). A faithful multi-line self-edit raises it; one faithful paragraph gives at most 1 (issue 37).
    A diagnostic, like answer_coverage, never a reward."""
    return sum(answer_coverage(passage, line) > 0 for line in self_edit_lines(text, variant))


def word_ngrams(text, n):
    """The text's word n-grams after SQuAD's normalisation, in order."""
    w = normalize(text).split()
    return [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]


def distinct_ngrams(texts, n=2):
    """The share of distinct word n-grams among all the n-grams of the texts, pooled (distinct-n): 1.0 when no
    n-gram repeats, falling as the texts share a template. RL-trained self-edit writers are reported to collapse onto
    a few templates (issue 24), so each round logs it for the self-edits it sampled and for those it kept.
    None when the texts hold no n-gram."""
    grams = [g for t in texts for g in word_ngrams(t, n)]
    return len(set(grams)) / len(grams) if grams else None


def shared_ngrams(texts_by_item, n=2):
    """The share of the self-edits' word n-grams that also occur in a self-edit of another item: 0 when every
    passage's self-edits speak only of their own passage, rising as they share a template. distinct-n falls as well
    when the k samples of one passage copy it alike; this one does not, so it tells copying from templating.
    texts_by_item: [(item, text)]. None when the texts hold no n-gram."""
    grams = [(item, word_ngrams(t, n)) for item, t in texts_by_item]
    items_of = {}
    for item, gs in grams:
        for g in gs:
            items_of.setdefault(g, set()).add(item)
    total = sum(len(gs) for _, gs in grams)
    return sum(len(items_of[g]) > 1 for _, gs in grams for g in gs) / total if total else None


def judge_says_yes(reply):
    """The official rule: yes only if "yes" appears and "no" does not."""
    words = re.findall(r"[a-z]+", reply.lower())
    return "yes" in words and "no" not in words
