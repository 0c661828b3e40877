"""
The run folder (everything a SEAL run needs to resume after kill -9, and to read or plot its results), its one
writer, the processes torchrun starts, and the run's progress line. Domain-free: seal.py's loop writes through it.
"""
import ctypes
import dataclasses
import datetime
import fcntl
import json
import os
import shlex
import signal
import socket
import sys
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


# A worker must not outlive its launcher: torchrun starts each in a session of its own, so a kill of the launcher's
# process group (kill -9 -- -PGID) misses them, and orphans would go on writing into the run folder.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent: int | None = None):
    """Have the kernel SIGKILL this process when its parent dies (Linux; elsewhere nothing). The signal fires when
    the parent *thread* that started this process ends: torchrun's agent and gpu_check.py start their children from
    their main thread. parent: the pid that started this process, when known (subprocess's preexec_fn:
    functools.partial(die_with_parent, os.getpid())), so that a parent which died before this call is noticed too;
    when not known, only a parent replaced by init (pid 1) is."""
    if _prctl is None:
        return
    if _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() == 1 or parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)  # orphaned already: what the signal would have done


class Ranks:
    def __init__(self):
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        if "TORCHELASTIC_RUN_ID" in os.environ:  # a worker of torchrun's agent (the launcher, train.sh's exec)
            die_with_parent()
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
#   lock, lock-<r>       held by the run's rank 0 and rank r while they live, naming them (hold_lock below)
# RunFolder owns these names and the rounds' markers: seal.py asks it for a path or a round's state.

# A ReST-EM round's state in the folder (RunFolder.round_state)
PENDING = "pending"          # not finished: sample, evaluate, select and fine-tune (again, after a kill)
UNCHANGED = "unchanged"      # finished with nothing kept: the policy is the round before's
NEW_POLICY = "new policy"    # finished: the M-step's policy is in policy_dir(r)


def write_atomic(path: Path, text: str):
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# One writer per file. Rank r holds an exclusive flock on the folder's `lock` (rank 0, which also writes every
# shared file) or `lock-<r>` (rank r > 0) before it writes anything, until its process ends: two launches on one
# folder would append the same evaluations twice. The kernel drops a flock with its holder's last descriptor, so a
# lock left by a killed run never blocks, while a live holder stops a second launch at once and is named.
_locks = {}  # lock file -> its open file, kept for this process's life (a second RunFolder on a folder reuses it)


def hold_lock(folder, rank: int = 0):
    """Take this rank's lock on the run folder (made if absent), or stop with who holds it and what to do."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = (folder / ("lock" if rank == 0 else f"lock-{rank}")).resolve()
    if path in _locks:
        return
    f = open(path, "a+")  # never truncated before it is held: it names the holder
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "a process that is starting"
        f.close()
        raise SystemExit(f"{folder} is in use by another run: its {path.name} is held by {holder}. Two runs "
                         f"writing one folder would repeat evaluations. Wait for that run to end, or stop it (kill "
                         f"its launcher, or that pid: a torchrun worker dies with its agent) and run this command "
                         f"again to resume it; or give this run another --out.")
    f.seek(0)
    f.truncate()
    launch = (f", a worker of torchrun's agent pid {os.getppid()}" if "TORCHELASTIC_RUN_ID" in os.environ else "")
    cmd = shlex.join(Path("/proc/self/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
                     if Path("/proc/self/cmdline").exists() else [sys.executable, *sys.argv])
    f.write(f"pid {os.getpid()} on {socket.gethostname()} (rank {rank}{launch}, since {time.strftime('%F %T')}): "
            f"{cmd}\n")
    f.flush()
    _locks[path] = f


class RunFolder:
    def __init__(self, cfg, items: dict | None = None, ranks: Ranks | None = None):
        """cfg: a seal.RunConfig, whose fingerprint a resume must match. items: the run's item ids by role; they
        join the fingerprint, since a data file can change under its name."""
        self.ranks = ranks or Ranks()
        self.dir = Path(cfg.out)
        hold_lock(self.dir, self.ranks.rank)
        cfg_file = self.dir / "config.json"
        self.results_file = self.dir / "results.json"
        fingerprint = {**cfg.fingerprint, **({"items": items} if items else {})}
        if cfg_file.exists():
            old = json.loads(cfg_file.read_text())
            diff = {k: (old.get(k), fingerprint.get(k)) for k in sorted(set(old) | set(fingerprint))
                    if old.get(k) != fingerprint.get(k)}
            if diff:
                shown = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
                raise SystemExit(f"{self.dir} holds a run with other settings or from an older version ({shown[:600]})"
                                 f"; use another --out")
        elif self.ranks.main:  # rank 0 writes the shared files
            write_atomic(cfg_file, json.dumps(fingerprint, indent=2))
        r = self.ranks.rank
        self.evals_file = self.dir / ("evals.jsonl" if r == 0 else f"evals-{r}.jsonl")
        own, twice = self.reload()
        if twice and self.ranks.main:
            print(f"warning: {self.dir} records {len(twice)} evaluation(s) more than once (the first: "
                  f"{twice[0][1]} in {twice[0][0]}), written by two runs at once before the folder had a lock; "
                  f"each is read once", flush=True)
        if self.evals_file.exists():  # drop a line cut short by a kill (it is evaluated again), and a repeat
            write_atomic(self.evals_file, "".join(json.dumps(rec) + "\n" for rec in own))

    def reload(self):
        """Read every rank's records (after a barrier: what all ranks finished), each (phase, item, k) once: the
        first line of it in file order. Returns this rank's own records and the (file, key) of the repeats."""
        self.done, own, twice = {}, [], []
        for f in sorted(self.dir.glob("evals*.jsonl")):
            for line in f.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill: dropped, evaluated again
                    continue
                key = (rec["phase"], rec["item"], rec["k"])
                if key in self.done:
                    twice.append((f.name, key))
                    continue
                self.done[key] = rec
                if f == self.evals_file:
                    own.append(rec)
        return own, twice

    def log(self, rec: dict):
        """Append a finished evaluation, unless it is recorded already (a resume never writes one twice)."""
        if (rec["phase"], rec["item"], rec["k"]) in self.done:
            return
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

    def policy_dir(self, r) -> Path:
        """Where ReST-EM round r's M-step saves the policy (a hub-style folder) and its m_step.json."""
        return self.dir / f"policy-round{r}"

    def round_state(self, r) -> str:
        """PENDING, UNCHANGED or NEW_POLICY: what the folder's marker says of ReST-EM round r."""
        done = self.policy_dir(r) / "DONE"
        if not done.exists():
            return PENDING
        return NEW_POLICY if done.read_text().strip() == "ok" else UNCHANGED

    def m_step_record(self, r) -> dict | None:
        """What round r's M-step returned (its loss per step, ...); None before it ran, or if the round kept nothing."""
        path = self.policy_dir(r) / "m_step.json"
        return json.loads(path.read_text()) if path.exists() else None

    def finish_round(self, r, m_step) -> str:
        """Round r's M-step on rank 0: m_step(folder) fine-tunes the policy, saves it there and returns its record
        (m_step.json); None leaves the policy unchanged. Then the round is marked finished, the other ranks having
        waited for it. Returns the round's state: NEW_POLICY or UNCHANGED."""
        folder = self.policy_dir(r)
        if self.ranks.main:
            folder.mkdir(exist_ok=True)
            if m_step is not None:
                write_atomic(folder / "m_step.json", json.dumps(m_step(folder)))
            (folder / "DONE").write_text("ok\n" if m_step is not None else "unchanged\n")
        self.ranks.barrier()
        return self.round_state(r)

    def write_results(self, result: dict):
        """The table (rank 0 only), atomically: a reader never sees half of it."""
        if self.ranks.main:
            write_atomic(self.results_file, json.dumps(result, indent=2))


# -----------------------------------------------------------------------------
# Progress: what a long run prints about itself


def fmt_time(s):
    return f"{s / 3600:.1f}h" if s > 5400 else f"{s / 60:.1f}m" if s > 90 else f"{s:.0f}s"


@dataclasses.dataclass
class Progress:
    """The whole run's ETA: evaluations left (all phases, all ranks) times this process's mean seconds over its
    last 8 evaluations (the first phases, with no self-edit to train on, are cheaper than the rest), shared over
    the ranks. Sampling and M-steps are not counted: a rough estimate, on the low side."""
    total: int
    done: int = 0                   # finished before this process started (read from the run folder)
    world: int = 1
    n: int = 0
    recent: list = dataclasses.field(default_factory=list)

    def tick(self, seconds) -> str:
        """One evaluation done in `seconds` (None: a shared record, which took no time)."""
        self.n, self.recent = self.n + 1, (self.recent + [seconds])[-8:] if seconds is not None else self.recent
        left = max(0, self.total - self.done - self.n * self.world)
        eta = left / self.world * sum(self.recent) / max(1, len(self.recent))
        return f"run {self.total - left}/{self.total}, run ETA ~{fmt_time(eta)}"
