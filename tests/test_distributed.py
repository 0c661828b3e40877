"""SEAL across processes: torchrun with gloo on the CPU gives the same records and table as one process, a run
whose rank is killed stops, then resumes without repeating a finished evaluation, a killed launcher takes its
workers with it, and a folder has one writer."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import checkpoint
from conftest import LLAMA, ROOT, random_model
from domains import knowledge as kn

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same arithmetic in one process and in two


@pytest.fixture(scope="module")
def args(tiny_chat_dir):
    ev, rl = kn.load_passages(kn.DATA / "fictional-eval.json", 3), kn.load_passages(kn.DATA / "fictional-rl.json", 2)
    (tiny_chat_dir / "dist-ev.json").write_text(json.dumps(ev))
    (tiny_chat_dir / "dist-rl.json").write_text(json.dumps(rl))
    return ["run", f"--model={tiny_chat_dir}", f"--eval_data={tiny_chat_dir / 'dist-ev.json'}",
            f"--rl_data={tiny_chat_dir / 'dist-rl.json'}", "--rounds=1", "--rl_samples=2", "--se_max_tokens=12",
            "--inner_epochs=1", "--eval_times=1", "--answer_tokens=4", "--sft_epochs=1", "--chat=true",
            "--cpt_epochs=1", "--sft_batch=2"]


def command(args, out, nproc):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return (launcher if nproc > 1 else [sys.executable]) + ["-m", "domains.knowledge", *args, f"--out={out}"]


def records(out):
    """Every evaluation line of every rank's file, as {(phase, item, k): record without timings}."""
    lines = [json.loads(x) for f in sorted(Path(out).glob("evals*.jsonl")) for x in f.read_text().splitlines()]
    drop = ("seconds", "train_seconds", "runs")
    recs = {(r["phase"], r["item"], r["k"]): {k: v for k, v in r.items() if k not in drop} for r in lines}
    assert len(recs) == len(lines)  # no evaluation was written twice
    return recs


def table(out):
    return [{k: r[k] for k in ("row", "score", "total", "metrics")}
            for r in json.loads((Path(out) / "results.json").read_text())["rows"]]


@pytest.fixture(scope="module")
def single(args, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    subprocess.run(command(args, out, 1), cwd=ROOT, env=ENV, check=True, capture_output=True)
    return out


def test_two_gloo_processes_equal_one(args, single, tmp_path):
    res = subprocess.run(command(args, tmp_path, 2), cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "evals-1.jsonl").exists()  # rank 1 did its share of the evaluations
    assert "[self_edit rank 1] sampled 1 self-edits" in res.stdout  # and of the sampling (item 2 of 3)
    assert "[rl1 rank 1] sampled 2 self-edits" in res.stdout
    assert records(tmp_path) == records(single)
    assert table(tmp_path) == table(single)


@pytest.fixture(scope="module")
def teacher_dir(tiny_chat_dir, smollm2_dir, tmp_path_factory):
    """A teacher unlike the student: other random weights, drawn larger (so its samples differ visibly)."""
    d = tmp_path_factory.mktemp("teacher")
    m = random_model({**LLAMA, "vocab_size": 49152, "bos_token_id": 1, "eos_token_id": 2}, seed=1, std=0.2)
    checkpoint.save(m, d, tokenizer_dir=smollm2_dir)
    return d


def test_the_teacher_row_samples_the_teacher_on_every_rank(args, teacher_dir, tmp_path):
    """Rank 1 samples its share of the teacher's self-edits from the teacher too (it once used the student)."""
    teacher = [*args, "--rows=teacher", f"--teacher={teacher_dir}"]
    one = subprocess.run(command(teacher, tmp_path / "one", 1), cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(command(teacher, tmp_path / "two", 2), cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "[teacher rank 1] sampled 1 self-edits" in two.stdout
    samples = [json.loads((tmp_path / d / "samples-teacher.json").read_text()) for d in ("one", "two")]
    assert len(samples[0]) == 3 and samples[1] == samples[0]
    assert records(tmp_path / "two") == records(tmp_path / "one")


def children(pid):
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(x) for x in (task / "children").read_text().split()]
    return kids


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds rank 1 through /proc (Linux)")
def test_a_killed_rank_stops_the_run_and_the_same_command_resumes(args, single, tmp_path):
    proc = subprocess.Popen(command(args, tmp_path, 2), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ((tmp_path / "evals-1.jsonl").exists() and (tmp_path / "evals-1.jsonl").read_text().count("\n") >= 1):
        assert proc.poll() is None and time.time() < deadline, "rank 1 never finished an evaluation"
        time.sleep(0.05)
    rank1 = [p for p in children(proc.pid) if b"RANK=1\0" in Path(f"/proc/{p}/environ").read_bytes()]
    assert len(rank1) == 1
    os.kill(rank1[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "Signal 9" in err  # torchrun stops the other rank and says which died
    assert not (tmp_path / "results.json").exists()
    done = records(tmp_path)
    res = subprocess.run(command(args, tmp_path, 2), cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "already done" in res.stdout and all(k in records(tmp_path) for k in done)
    assert records(tmp_path) == records(single) and table(tmp_path) == table(single)


def alive(pid):
    """Running, or stopped: neither gone nor a zombie waiting for its new parent to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def gone_within(pids, seconds):
    deadline = time.time() + seconds
    while any(alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def evaluations(out):
    return sum(f.read_text().count("\n") for f in Path(out).glob("evals*.jsonl"))


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the workers through /proc (Linux)")
@pytest.mark.parametrize("nproc", [1, 2])
def test_kill_9_of_the_launch_three_times_then_resume(args, single, tmp_path, nproc):
    """What a user does (docs/running.md): kill -9 the launcher's whole process group at a random moment, three
    times, then the same command. No worker outlives its launcher (torchrun starts each in a session of its own, out
    of the group's reach), a second launch on the folder in use is refused, and the resumed run has every record
    exactly once, equal to an uninterrupted run's."""
    out, rng, seen = tmp_path / "run", random.Random(nproc), []
    try:
        for kill in range(3):
            before = evaluations(out) if out.exists() else 0
            with open(tmp_path / f"log{kill}", "w") as log:
                proc = subprocess.Popen(command(args, out, nproc), cwd=ROOT, env=ENV, stdout=log, stderr=log,
                                        start_new_session=True)  # its own group, as a shell gives a command
            seen.append(proc.pid)
            deadline = time.time() + 120
            while evaluations(out) <= before if out.exists() else True:
                assert proc.poll() is None and time.time() < deadline, (tmp_path / f"log{kill}").read_text()[-3000:]
                time.sleep(0.02)
            time.sleep(rng.uniform(0, 0.5))
            launch = [proc.pid, *children(proc.pid)]
            seen += launch[1:]
            assert len(launch) == 1 + (nproc if nproc > 1 else 0)
            for pid in launch:  # frozen where they are (a stopped process still dies of SIGKILL)
                os.kill(pid, signal.SIGSTOP)
            if kill == 0:  # the folder is in use: a second launch stops at once and names rank 0
                rank0 = proc.pid if nproc == 1 else next(p for p in launch[1:]
                                                         if b"RANK=0\0" in Path(f"/proc/{p}/environ").read_bytes())
                second = subprocess.run(command(args, out, 1), cwd=ROOT, env=ENV, capture_output=True, text=True,
                                        timeout=120)
                assert second.returncode != 0
                assert f"{out} is in use by another run: its lock is held by pid {rank0} on" in second.stderr
            os.killpg(proc.pid, signal.SIGKILL)  # kill -9 -- -PGID
            proc.wait()
            assert gone_within(launch, 5) == []
    finally:  # a failed check leaves no process behind
        for pid in seen:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert not (out / "results.json").exists()  # every kill landed before the end
    res = subprocess.run(command(args, out, nproc), cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "already done" in res.stdout and "more than once" not in res.stdout
    assert records(out) == records(single) and table(out) == table(single)  # records(): each line a new key


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="Linux: prctl")
def test_a_child_started_through_die_with_parent_dies_with_it():
    """How gpu_check.py starts its stages: a parent killed at its limit takes its child with it."""
    code = ("import functools, os, subprocess, time, run_folder; p = subprocess.Popen(['sleep', '60'], "
            "preexec_fn=functools.partial(run_folder.die_with_parent, os.getpid())); print(p.pid, flush=True); "
            "time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert alive(child)
    parent.kill()
    parent.wait()
    assert gone_within([child], 5) == []
