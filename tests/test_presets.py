"""train.sh's presets away from the machine they were made for: the paper presets (what train.sh runs on a GPU)
from a local model folder at a tiny random shape on the CPU, so that their code path (the paper's ARC split and
numpy grids, the knowledge run's plain-text base-model prompts) has run once before it meets a GPU; and train.sh
on a machine whose python3 has every package already (a lent GPU machine without network: no venv, no pip)."""
import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT
from domains import arc
from domains import knowledge as kn
from tools.gpu_check import preset


def results(out):
    return {r["row"]: r for r in json.loads((Path(out) / "results.json").read_text())["rows"]}


def test_arc_paper_preset_from_a_local_folder(tiny_chat_dir, tmp_path):
    paper = json.loads((ROOT / "data/arc/paper.json").read_text())
    split = tmp_path / "split.json"  # the smallest RL and evaluation tasks of the paper's split (6x6, 4x4 grids)
    assert "6150a2bd" in paper["rl"] and "66e6c45b" in paper["eval"]
    split.write_text(json.dumps({"rl": ["6150a2bd"], "eval": ["66e6c45b"]}))
    args = preset("arc", paper=True)
    assert "--split=paper" in args and "--fmt=numpy" in args
    arc.main(["run", *args, f"--model={tiny_chat_dir}", "--device=cpu", f"--out={tmp_path / 'run'}",
              f"--split={split}", "--rows=oracle,seal", "--rl_samples=1", "--eval_samples=1", "--se_max_tokens=8",
              "--max_examples=2", "--sft_epochs=1"])
    rows = results(tmp_path / "run")
    assert set(rows) == {"oracle", "seal"} and rows["oracle"]["total"] == 1
    rec = [json.loads(x) for x in (tmp_path / "run" / "evals.jsonl").read_text().splitlines()]
    oracle = [r for r in rec if r.get("train")]  # the oracle's TTT ran on numpy-format grids
    assert oracle and all(r["examples"] == 2 and r["train"]["steps"] > 0 for r in oracle)


def test_knowledge_paper_preset_from_a_local_folder(tiny_chat_dir, tmp_path):
    args = preset("knowledge", paper=True)
    kn.main(["run", *args, f"--model={tiny_chat_dir}", "--device=cpu", f"--out={tmp_path / 'run'}", "--max_eval=1",
             "--max_rl=1", "--rl_samples=1", "--rounds=1", "--eval_times=1", "--inner_epochs=1", "--se_max_tokens=8",
             "--answer_tokens=4", "--sft_epochs=1", "--rows=seal"])
    rows = results(tmp_path / "run")
    assert set(rows) == {"seal"} and 0 <= rows["seal"]["rate"] <= 1


def test_train_sh_runs_without_venv_or_pip_where_python3_has_the_packages(tmp_path):
    venv = tmp_path / "no-venv"
    env = {**os.environ, "SEAL_VENV": str(venv), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    res = subprocess.run(["bash", "train.sh", "arc", "--help"], cwd=ROOT, capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "settings (ArcConfig)" in res.stdout and "--split=tiny" in res.stdout  # the CPU preset, through python3
    assert "set-up" not in res.stdout + res.stderr and not venv.exists()  # no venv made, no pip run
