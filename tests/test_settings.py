"""settings.py: --key=value overrides and --help, which lists a command's settings with their values and the
comments written beside the fields, for every command that has settings."""
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

import sampling
import settings
from conftest import ROOT
from domains import arc
from domains import knowledge as kn
from domains import knowledge_studies as ks
from tools import bench


@dataclass
class Base:
    size: int = 3                   # how many
    # a section comment documents no field
    name: str = "x"                 # a comment that goes on
                                    # over two lines
    bare: float = 0.5


@dataclass
class Child(Base):
    size: int = 4                   # redefined without a comment below keeps the base's; this one wins
    name: str = "y"
    extra: bool = False  # its own


def test_the_comments_beside_the_fields_are_the_documentation():
    assert settings.field_comments(Child) == {
        "size": "redefined without a comment below keeps the base's; this one wins",
        "name": "a comment that goes on over two lines", "extra": "its own"}


def test_help_lists_every_setting_with_its_value_and_comment(capsys):
    with pytest.raises(SystemExit) as stop:
        settings.parse_overrides(Child(), ["--size=7", "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out[1:]] == ["--size=7", "--name=y", "--bare=0.5", "--extra=false"]
    assert out[1].split(None, 1)[1] == "(default 4) redefined without a comment below keeps the base's; this one wins"
    assert out[2].split(None, 1)[1] == "a comment that goes on over two lines"


@pytest.mark.parametrize("command", [
    lambda: kn.main(["run", "--help"]), lambda: arc.main(["run", "-h"]), lambda: ks.main(["filter", "--help"]),
    lambda: ks.main(["prompts", "--help"]), lambda: ks.main(["reliability", "--help"]),
    lambda: ks.main(["forget", "--help"]), lambda: sampling.cli_generate(["--help"]),
    lambda: bench.parse_args(["--help"])])
def test_every_command_answers_help(command, capsys):
    with pytest.raises(SystemExit) as stop:
        command()
    out = capsys.readouterr().out
    assert stop.value.code == 0 and "expected --key=value" not in out
    assert "--model=" in out and "--device=auto" in out


def test_a_domains_help_shows_its_own_and_the_shared_settings(capsys):
    with pytest.raises(SystemExit):
        kn.main(["run", "--max_eval=8", "--help"])
    out = capsys.readouterr().out
    assert "--n_eval=0" in out and "evaluation passages: the first n of eval_data" in out
    assert "--max_eval=8" in out and "(default 0) a cap, not a count" in out
    assert "self-edits per RL passage" in out  # knowledge's comment on a shared field wins over the shared one
    with pytest.raises(SystemExit) as stop:
        kn.main(["--help"])  # no command: the module's commands
    assert stop.value.code == 0 and "python -m domains.knowledge run" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        ks.main(["--help"])  # the studies' commands
    assert stop.value.code == 0 and "python -m domains.knowledge_studies forget" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        ks.main(["squad", "--help"])
    assert stop.value.code == 0 and "--squad=" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--help lists the settings"):
        kn.main(["run", "n_eval=3"])


@pytest.mark.skipif(not (Path(sys.prefix) / ".seal-setup").exists(), reason="train.sh needs a set-up venv")
def test_train_sh_passes_help_through_with_its_preset():
    res = subprocess.run(["bash", "train.sh", "knowledge", "--help"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "SEAL_VENV": sys.prefix}, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "--max_eval=" in res.stdout and "--inner_lr=" in res.stdout
    assert res.stdout.count("settings (KnowledgeConfig)") == 1  # --help is not sharded over processes
    res = subprocess.run(["bash", "train.sh", "knowledge", "forget", "--help"], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "SEAL_VENV": sys.prefix}, timeout=300)
    assert res.returncode == 0 and "--n_forget=" in res.stdout and "--inner_lr=" in res.stdout  # a study, preset


def test_a_setting_outside_its_options_stops_naming_them():
    with pytest.raises(SystemExit, match=re.escape("--dtype='fp16': expected one of auto, fp32, bf16")):
        settings.device_and_dtype(SimpleNamespace(device="cpu", dtype="fp16"))


def test_more_processes_than_gpus_exit_with_the_reason():
    """torchrun --nproc_per_node=N puts process i on cuda:i (NCCL needs a GPU each): N above the GPU count must
    stop with the reason, not with an invalid device ordinal or an NCCL error."""
    assert settings.process_device(0, {"LOCAL_WORLD_SIZE": "4", "LOCAL_RANK": "3"}) == "cpu"  # gloo on the CPU
    assert settings.process_device(2, {"LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == "cuda:1"
    assert settings.process_device(1, {}) == "cuda:0"  # no torchrun
    with pytest.raises(SystemExit, match="--nproc=3 processes on a machine with 1 GPU"):
        settings.process_device(1, {"LOCAL_WORLD_SIZE": "3", "LOCAL_RANK": "0"})  # every rank, rank 0 included
