"""
The run folder (everything a SEAL run needs to resume after kill -9, and to read or plot its results) and the
processes torchrun starts. Domain-free: seal.py's loop writes through it.
"""
import datetime
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from settings import process_device

# -----------------------------------------------------------------------------
# Processes. Self-edit samples and evaluations are independent, so torchrun can shard them: item i of a sampling
# phase and job j of an evaluation phase go to ranks i % world and j % world. Rank 0 writes the samples, runs the
# M-step and writes the table; the others wait at a barrier and read what it wrote. Without torchrun's RANK /
# WORLD_SIZE this is rank 0 of 1 and there is no process group.


class Ranks:
    def __init__(self):
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        if self.world > 1 and not dist.is_initialized():
            gpu = torch.cuda.is_available()
            if gpu:  # one GPU per process, or a clear exit (settings.process_device)
                torch.cuda.set_device(process_device(torch.cuda.device_count()))
            else:  # the processes of one machine split its cores: N processes are never slower than one
                torch.set_num_threads(max(1, torch.get_num_threads() // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
            # a phase can run for hours between barriers; a dead rank is torchrun's to report (it stops the rest)
            dist.init_process_group("nccl" if gpu else "gloo", timeout=datetime.timedelta(days=1))

    @property
    def main(self):
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def all_gather(self, obj) -> list:
        """Every rank's obj (pickled: small things such as sampled token ids), in rank order."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


# -----------------------------------------------------------------------------
# The run folder: everything needed to resume after kill -9 and to read or plot the results.
#   config.json          settings that change results (a resume under other values is refused)
#   samples-<phase>.json sampled self-edits of a phase, written once, atomically, before any is evaluated
#   evals.jsonl          one line per finished (phase, item, k) evaluation, appended and fsynced (rank r > 0 of
#                        torchrun writes evals-<r>.jsonl; all are read, so a resume works under any world size)
#   policy-round<r>/     the policy after ReST-EM round r (hub-style folder, loadable by transformers), its
#                        m_step.json, and DONE ("ok", or "unchanged" when the round kept nothing) once finished
#   results.json         the table: reward per row, beside the paper's numbers


def write_atomic(path: Path, text: str):
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunFolder:
    def __init__(self, cfg, items: dict | None = None, ranks: Ranks | None = None):
        """cfg: a seal.RunConfig, whose fingerprint a resume must match. items: the run's item ids by role; they
        join the fingerprint, since a data file can change under its name."""
        self.ranks = ranks or Ranks()
        self.dir = Path(cfg.out)
        self.dir.mkdir(parents=True, exist_ok=True)
        cfg_file = self.dir / "config.json"
        fingerprint = {**cfg.fingerprint, **({"items": items} if items else {})}
        if cfg_file.exists():
            old = json.loads(cfg_file.read_text())
            diff = {k: (old.get(k), fingerprint.get(k)) for k in sorted(set(old) | set(fingerprint))
                    if old.get(k) != fingerprint.get(k)}
            if diff:
                shown = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
                raise SystemExit(f"{self.dir} holds a run with other settings or from an older version ({shown[:600]})"
                                 f"; use another --out")
        else:
            write_atomic(cfg_file, json.dumps(fingerprint, indent=2))
        r = self.ranks.rank
        self.evals_file = self.dir / ("evals.jsonl" if r == 0 else f"evals-{r}.jsonl")
        self.done = {}
        own = self.reload()
        if self.evals_file.exists():  # drop a line cut short by a kill (it is evaluated again)
            write_atomic(self.evals_file, "".join(json.dumps(rec) + "\n" for rec in own))

    def reload(self):
        """Read every rank's records (after a barrier: what all ranks finished). Returns this rank's own."""
        own = []
        for f in sorted(self.dir.glob("evals*.jsonl")):
            for line in f.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill: dropped, evaluated again
                    continue
                self.done[(rec["phase"], rec["item"], rec["k"])] = rec
                if f == self.evals_file:
                    own.append(rec)
        return own

    def log(self, rec: dict):
        with open(self.evals_file, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[(rec["phase"], rec["item"], rec["k"])] = rec

    def samples(self, phase, make):
        """The sampled self-edits of a phase: made once (every rank calls make(), which shares the work out and
        gathers it; rank 0 writes the file), then read back, also on every resume."""
        path = self.dir / f"samples-{phase}.json"
        self.ranks.barrier()  # all ranks see the folder alike: all sample or none (every rank calls this per phase)
        if not path.exists():
            made = make()  # gathers from every rank, so no rank writes before all have looked above
            if self.ranks.main:
                write_atomic(path, json.dumps(made))
        self.ranks.barrier()
        return json.loads(path.read_text())

    def sync(self):
        """After every rank's share of a phase: wait for all, then read what they wrote."""
        if self.ranks.world > 1:
            self.ranks.barrier()
            self.reload()

    def once(self, phase, make):
        """A phase of one job (item "all") that rank 0 alone runs, once (read back on a resume); the others wait."""
        if self.ranks.main and (phase, "all", 0) not in self.done:
            t0 = time.time()
            self.log({"phase": phase, "item": "all", "k": 0, **make(), "seconds": round(time.time() - t0, 2)})
        self.sync()
        return self.done[(phase, "all", 0)]

    def finished_round(self, r):
        """The folder of the policy after ReST-EM round r once the round is finished ("" when it kept nothing:
        the policy did not change); None before."""
        done = self.dir / f"policy-round{r}" / "DONE"
        if not done.exists():
            return None
        return str(done.parent) if done.read_text().strip() == "ok" else ""

    def finish_round(self, r, m_step):
        """Round r's M-step on rank 0: m_step(folder) fine-tunes the policy, saves it there and returns its record
        (m_step.json); None leaves the policy unchanged. Then the round is marked finished and the other ranks,
        which waited, load the new policy from the folder returned to them ("" on rank 0, which holds it)."""
        folder = self.dir / f"policy-round{r}"
        if self.ranks.main:
            folder.mkdir(exist_ok=True)
            if m_step is not None:
                write_atomic(folder / "m_step.json", json.dumps(m_step(folder)))
            (folder / "DONE").write_text("ok\n" if m_step is not None else "unchanged\n")
        self.ranks.barrier()
        return str(folder) if m_step is not None and not self.ranks.main else ""
