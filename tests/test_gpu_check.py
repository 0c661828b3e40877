"""gpu_check.py, the one prepared GPU command, run on the CPU at a tiny random shape: every stage runs, and the JSON
holds what the GPU run will be read for. Behaviour only: no figure is asserted beyond its sanity."""
import json
import os
import subprocess
import sys
import time

import pytest

from tools import gpu_check
from conftest import ROOT


def tiny_args(out, seal_model, *more):
    split = out.parent / "split.json"  # one RL and one evaluation task: random weights answer to the token limit
    split.write_text(json.dumps({"rl": ["6150a2bd"], "eval": ["5582e5ca"]}))
    return [f"--out={out}", "--shape=tiny", f"--seal_model={seal_model}", "--compile=false", "--threads=1",
            "--examples=2", "--samples=2", "--sample_tokens=4", "--answer_tokens=3", "--prompt_min=20",
            "--prompt_max=80", "--completion_max=12", "--agree_steps=2", "--agree_tokens=4", "--paper_examples=2",
            "--knowledge_args=--max_eval=1 --max_rl=1 --rl_samples=1 --rounds=1 --eval_times=1 --inner_epochs=1 "
            "--se_max_tokens=8 --answer_tokens=4 --sft_epochs=1 --cpt_epochs=1 --rows=seal",
            f"--arc_args=--split={split} --rl_samples=1 --se_max_tokens=8 --max_examples=2 "
            "--oracle=basic:output:1e-3:1 --sft_epochs=1 --rows=seal", *more]


def test_every_stage_on_a_tiny_shape(tiny_chat_dir, tmp_path):
    out, mirror = tmp_path / "check", tmp_path / "returned"
    rep = gpu_check.main(gpu_check.parse_args(tiny_args(out, tiny_chat_dir, f"--mirror={mirror}")))
    saved = json.loads((out / "gpu-check.json").read_text())
    assert saved["summary"] == rep["summary"] and saved["device"] == "cpu"
    for name in ("gpu-check.json", "gpu-check.log"):  # the folder that comes back holds the same files
        assert (mirror / name).read_text() == (out / name).read_text()
    st = saved["stages"]
    assert list(st) == list(gpu_check.STAGES)
    for name in ("bench_compiled", "arc_eval_compiled"):
        assert st[name] == {"status": "skipped", "reason": "--compile=false"}
    for name in ("bench", "arc_eval", "agreement", "arc_eval_paper", "knowledge", "arc_tiny"):
        assert st[name]["status"] == "done", (name, st[name])
        assert 0 < st[name]["seconds"] <= st[name]["limit_s"]

    bench = st["bench"]["result"]
    assert bench["model"] == "random:tiny" and bench["dtype"] == "torch.float32"
    il = bench["inner_loop"]
    assert il["steps"] == 1 and il["flop_s_ours"] > 0 and il["matmul_peak"]["peak_flop_s"] > 0
    assert il["first_loss_ours"] == pytest.approx(il["first_loss_theirs"], abs=1e-3)
    assert bench["answers"]["same_rows"] == 40 and bench["sampling"]["samples_per_prompt"] == 2

    for name, config in (("arc_eval", "tiny"), ("arc_eval_paper", "paper")):
        arc = st[name]["result"]
        assert arc["config"] == config and not arc["compiled"] and arc["shape"] == "tiny"
        for run in ("cold", "warm"):
            e = arc[run]
            assert e["steps"] > 0 and e["train_tokens"] > 0 and e["config"] == config
            assert e["seconds"] >= e["train_seconds"] + e["answer_seconds"] - 0.05
    assert st["arc_eval_paper"]["result"]["warm"]["examples"] == 2  # --paper_examples
    assert st["arc_eval_paper"]["result"]["warm"]["task"] in json.loads((ROOT / "data/arc/paper.json").read_text())["eval"]

    ag = st["agreement"]["result"]
    assert ag["real_weights"] and ag["model"] == str(tiny_chat_dir)
    assert len(ag["losses_fp32"]) == len(ag["losses_bf16"]) == 2 and ag["rows"] == 40
    assert all(r < 0.05 for r in ag["loss_rel_diff"])  # bf16 rounding of a tiny model: well under 5%
    assert 0 <= ag["first_token_share"] <= 1 and isinstance(ag["within_tolerance"], bool)

    for name in ("knowledge", "arc_tiny"):
        res = st[name]["result"]
        assert res["evaluations_done"] > 0 and res["rows"], (name, res)
        assert all(0 <= row["rate"] <= 1 for row in res["rows"])
    assert "--model=" + str(tiny_chat_dir) in st["knowledge"]["command"] and "--max_rl=1" in st["knowledge"]["command"]

    s = saved["summary"]
    assert set(s) == {"eager", "arc_eval", "bf16_agreement"}  # no goals on a CPU, no compiled run
    assert s["eager"]["inner_loop_tok_s"] == il["ours_tok_s"] and s["eager"]["inner_loop_mfu"] is None
    assert s["arc_eval"]["arc_eval_paper"]["steps"] == st["arc_eval_paper"]["result"]["warm"]["steps"]
    assert s["bf16_agreement"] == {"real_weights": True, "model": str(tiny_chat_dir),
                                   "within_tolerance": ag["within_tolerance"]}
    assert (out / "gpu-check.log").read_text().count("==== ") == 6  # one header per stage that ran


def test_budget_skips_and_resume_keeps_finished_stages(tmp_path):
    out = tmp_path / "check"
    no_model = tmp_path / "absent"
    args = tiny_args(out, no_model, "--stages=agreement,knowledge")
    rep = gpu_check.main(gpu_check.parse_args(args + ["--budget=5"]))  # below a stage's minimum start
    assert rep["stages"]["agreement"]["status"] == "skipped" and "budget" in rep["stages"]["agreement"]["reason"]
    assert rep["stages"]["knowledge"] == {"status": "skipped",
                                          "reason": f"--seal_model={no_model} is not a folder"}
    rep = gpu_check.main(gpu_check.parse_args(args))  # a rerun: agreement now runs (random weights: no model)
    assert rep["stages"]["agreement"]["status"] == "done"
    assert not rep["stages"]["agreement"]["result"]["real_weights"]
    # random weights make near-ties in every greedy argmax: no verdict on bf16 from them
    assert rep["summary"]["bf16_agreement"]["within_tolerance"] is None
    seconds = rep["stages"]["agreement"]["seconds"]
    rep = gpu_check.main(gpu_check.parse_args(args))  # and a third run keeps it
    assert rep["stages"]["agreement"]["seconds"] == seconds
    with pytest.raises(SystemExit, match="unknown stage"):
        gpu_check.main(gpu_check.parse_args([f"--out={out}", "--stages=bench,nope"]))


def test_presets_come_from_train_sh():
    kn, arc = gpu_check.preset("knowledge"), gpu_check.preset("arc")
    assert "--model=smollm2-135m" in kn and "--inner_epochs=10" in kn and "--chat=true" in kn
    assert "--split=tiny" in arc and "--max_examples=24" in arc and not any("Llama" in a for a in arc)
    kn, arc = gpu_check.preset("knowledge", paper=True), gpu_check.preset("arc", paper=True)
    assert kn == ["--model=Qwen/Qwen2.5-7B", "--out=runs/knowledge-paper"]
    assert arc == ["--model=meta-llama/Llama-3.2-1B-Instruct", "--split=paper", "--fmt=numpy", "--out=runs/arc-paper"]


def test_a_compiled_stage_cut_off_keeps_the_eager_result(tiny_chat_dir, tmp_path):
    """The mirror (the device tool's $OUT) holds each stage's result as soon as the stage ends, while the command
    still runs; the cold compile of arc_eval_compiled runs past its cap and is recorded as timed_out, and the
    eager evaluation before it, its own stage, is kept."""
    out, mirror = tmp_path / "check", tmp_path / "returned"
    args = tiny_args(out, tiny_chat_dir, "--stages=arc_eval,arc_eval_compiled", "--compile=true",
                     "--caps=arc_eval_compiled:4", f"--mirror={mirror}")
    proc = subprocess.Popen([sys.executable, "tools/gpu_check.py", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        seen = lambda: json.loads((mirror / "gpu-check.json").read_text())["stages"] if (mirror / "gpu-check.json"
                                                                                     ).exists() else {}
        t0 = time.monotonic()
        # a running stage is mirrored as it grows ("running"): wait for the stage to end
        while seen().get("arc_eval", {}).get("status") in (None, "running") and proc.poll() is None and (
                time.monotonic() - t0 < 120):
            time.sleep(0.1)
        assert seen()["arc_eval"]["status"] == "done" and proc.poll() is None  # back before the command ends
        assert proc.wait(timeout=120) == 0
    finally:
        proc.kill()
    st = seen()
    assert st["arc_eval"]["result"]["warm"]["steps"] > 0
    assert st["arc_eval_compiled"]["status"] == "timed_out" and st["arc_eval_compiled"]["limit_s"] == 4
    assert "==== arc_eval_compiled" in (mirror / "gpu-check.log").read_text()


def test_the_plan_adds_up(capsys):
    """`train.sh gpu-check --plan`: each lent call's stages, their caps and the call's timeout; start-up, the calls
    and the gap between them fit the loan's device time, and each call fits one command's 600 s. A cap raised
    past the loan is refused before anything runs."""
    cfg = gpu_check.parse_args(["--plan"])
    p = gpu_check.main(cfg)
    calls = p["calls"]
    assert p["fits"] and p["total_s"] <= cfg.device_s
    assert sum(calls[c]["timeout_s"] for c in gpu_check.LENT) + cfg.startup_s + cfg.gap_s <= cfg.device_s
    for name, c in calls.items():
        assert list(c["stages"]) == list(gpu_check.CALLS[name])
        assert c["budget"] == sum(gpu_check.CAPS[s] for s in c["stages"])
    assert all(calls[c]["timeout_s"] <= 600 for c in gpu_check.LENT)
    assert sorted(s for c in gpu_check.CALLS.values() for s in c) == sorted(gpu_check.STAGES)  # each stage once
    printed = capsys.readouterr().out
    assert all(s in printed for s in gpu_check.STAGES) and "fits" in printed and "DOES NOT FIT" not in printed
    with pytest.raises(SystemExit):
        gpu_check.main(gpu_check.parse_args(["--plan", "--caps=bench:400"]))
    assert "DOES NOT FIT" in capsys.readouterr().out
    shell = subprocess.run(["bash", "train.sh", "gpu-check", "--plan"], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "SEAL_VENV": sys.prefix}, timeout=300)
    assert shell.returncode == 0 and shell.stdout.strip().endswith("fits"), shell.stderr


def test_a_stage_killed_mid_way_leaves_what_it_measured(tmp_path):
    """The whole command killed while bench runs (a call that reaches its limit): the mirror already holds the
    inner loop that bench measured before its long sampling race, marked as running."""
    out, mirror = tmp_path / "check", tmp_path / "returned"
    args = tiny_args(out, tmp_path / "absent", "--stages=bench", "--samples=8", "--sample_tokens=4000",
                     f"--mirror={mirror}")
    proc = subprocess.Popen([sys.executable, "tools/gpu_check.py", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    bench = lambda: json.loads((mirror / "gpu-check.json").read_text())["stages"].get("bench", {}) if (
        mirror / "gpu-check.json").exists() else {}
    try:
        t0 = time.monotonic()
        while "inner_loop" not in bench().get("result", {}) and proc.poll() is None and time.monotonic() - t0 < 120:
            time.sleep(0.2)
        assert proc.poll() is None  # still sampling
    finally:
        proc.kill()
        proc.wait()
    st = bench()
    assert st["status"] == "running" and st["result"]["inner_loop"]["ours_tok_s"] > 0
    assert "sampling" not in st["result"] and 0 < st["limit_s"] <= gpu_check.CAPS["bench"]
    assert "==== bench" in (mirror / "gpu-check.log").read_text()


def test_goals_need_the_compiled_figure():
    """A goal read from eager figures alone says nothing of the compiled path it is set for: None until the
    compiled stage brings its figure, then the better of the two. Greedy rows of random bf16 weights are counted,
    with no verdict."""
    def bench_stage(mfu, share):
        return {"status": "done", "result": {"model": "random:llama-3.2-1b", "dtype": "torch.bfloat16",
                                             "inner_loop": {"mfu_ours": mfu}, "answers": {"same_rows": 31},
                                             "sampling": {"bandwidth_share_ours": share}}}
    run = lambda s: {"task": "t", "examples": 3, "steps": 9, "train_tokens": 99, "seconds": s, "train_seconds": 1,
                     "answer_seconds": 1}
    arc = lambda s: {"status": "done", "result": {"config": "tiny", "cold": run(2 * s), "warm": run(s)}}
    eager = {"bench": bench_stage(0.45, 0.6), "arc_eval": arc(4.0)}
    s = gpu_check.summary(eager, "cuda")
    assert s["goals"] == {"inner_loop_mfu_ge_0.40": None, "decode_bandwidth_share_ge_0.50": None,
                          "arc_eval_under_5_s": None}
    assert s["eager"]["answers_same_rows"] is None and s["eager"]["answers_same_rows_no_verdict"] == 31
    both = {**eager, "bench_compiled": bench_stage(0.35, 0.4), "arc_eval_compiled": arc(6.0)}
    assert gpu_check.summary(both, "cuda")["goals"] == {"inner_loop_mfu_ge_0.40": True,
                                                        "decode_bandwidth_share_ge_0.50": True,
                                                        "arc_eval_under_5_s": True}
    cut = {**both, "bench_compiled": {"status": "timed_out", "result": {"inner_loop": {"mfu_ours": 0.35}}}}
    goals = gpu_check.summary(cut, "cuda")["goals"]  # cut off before sampling: that goal waits for its figure
    assert goals["inner_loop_mfu_ge_0.40"] is True and goals["decode_bandwidth_share_ge_0.50"] is None


def test_no_cuda_stops_before_the_stages_and_a_half_written_folder_is_redone(tmp_path):
    """A GPU machine whose CUDA did not start would run the 1B shape on its CPU in every stage until each cap:
    the check stops at once, and says why in the mirror. A random-weights folder cut off mid-write is not
    taken for a whole one."""
    out, mirror = tmp_path / "check", tmp_path / "returned"
    with pytest.raises(SystemExit, match="no CUDA device"):
        gpu_check.main(gpu_check.parse_args([f"--out={out}", f"--mirror={mirror}", "--stages=bench"]))
    saved = json.loads((mirror / "gpu-check.json").read_text())
    assert "no CUDA device" in saved["error"] and saved["stages"] == {}
    folder = tmp_path / "random-tiny"
    (tmp_path / "random-tiny.tmp").mkdir()
    (tmp_path / "random-tiny.tmp" / "model.safetensors").write_bytes(b"cut off")  # a kill before the tokenizer
    assert gpu_check.random_folder("tiny", folder) == folder
    assert {p.name for p in folder.iterdir()} >= {"model.safetensors", "tokenizer.json", "config.json"}
    assert not (tmp_path / "random-tiny.tmp").exists()
