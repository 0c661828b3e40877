"""The README stays a guide (results go to docs/), and docs/domain.md's example domain runs as a new user runs it:
pasted into domains/facts.py of a fork, launched with `bash train.sh facts`."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

README_LIMIT = 12_800  # bytes. The guide is ~12 KB; a result that would push it past this belongs in docs/


def test_readme_stays_a_guide():
    text = (ROOT / "README.md").read_text()
    size = len(text.encode())
    assert size <= README_LIMIT, f"README.md is {size} bytes, over {README_LIMIT}: put results history in docs/"
    for heading in ("## Commands", "## Where each step of the paper lives", "### ARC", "### Knowledge incorporation",
                    "## Files", "## The domain contract"):
        assert heading in text
    for link in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (ROOT / link).exists(), link


def test_the_example_domain_runs_through_train_sh(tiny_chat_dir, tmp_path):
    code = re.search(r"```python\n(.*?)```", (ROOT / "docs/domain.md").read_text(), re.S).group(1)
    fork = tmp_path / "fork"  # the repository (linked, not copied) with one more file: domains/facts.py
    (fork / "domains").mkdir(parents=True)
    for p in ROOT.iterdir():
        if p.name not in ("domains", "train.sh", ".git", ".venv", "runs", "tests"):
            (fork / p.name).symlink_to(p)
    (fork / "train.sh").write_text((ROOT / "train.sh").read_text())  # it runs from its own folder
    for p in (ROOT / "domains").glob("*.py"):
        (fork / "domains" / p.name).symlink_to(p)
    (fork / "domains" / "facts.py").write_text(code)
    env = {**os.environ, "SEAL_VENV": str(tmp_path / "no-venv"),  # this python3, no venv (test_presets.py)
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    res = subprocess.run(["bash", str(fork / "train.sh"), "facts", f"--model={tiny_chat_dir}", "--device=cpu",
                          f"--out={out}", "--rl_samples=2", "--se_max_tokens=8", "--inner_epochs=1"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    table = json.loads((out / "results.json").read_text())
    assert table["domain"] == "Facts" and [r["row"] for r in table["rows"]] == ["base", "fact", "self_edit", "seal"]
    assert all(r["total"] == 2 for r in table["rows"]) and table["rounds"][0]["samples"] == 3 * 2
    records = [json.loads(x) for x in (out / "evals.jsonl").read_text().splitlines()]
    assert {r["phase"] for r in records} == {"base", "fact", "self_edit", "rl1", "seal"}
