"""
Inner-loop throughput: our packed LoRA training (lora.train) against transformers + PEFT with a plain loop over
right-padded batches, which is what the official SEAL run does (reference §1.5). Same weights, same data, same
batches, same hyperparameters (LoRA r128 alpha16 on q,v,gate,up,down; bs 2; AdamW; clip 1.0; cosine).

    python bench.py                                  # random SmolLM2-135M-shaped model, no network needed
    python bench.py --model=smollm2-135m --examples=16 --out=runs/bench.json

Throughput counts REAL tokens only (prompt + completion), for both sides. The two loops run interleaved step by
step, so a busy machine slows both alike. On CUDA both use bf16 base weights with fp32 adapters.
"""
import json
import sys
import time
from dataclasses import dataclass, asdict

import torch

import lora
import model as model_lib

TARGETS = ("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj")
SMOLLM2_135M = dict(  # the shape of SmolLM2-135M (offline-model.md), random weights
    model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0,
    max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}  # dense bf16, for MFU


@dataclass
class Bench:
    model: str = ""              # a folder / hub id / "smollm2-135m"; empty: random SmolLM2-135M-shaped weights
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
    seed: int = 0
    device: str = "auto"
    threads: int = 1             # CPU threads for both sides; 0: torch's default. On a shared 2-core machine two
                                 # threads ran ~4x slower than one (OpenMP workers waiting on each other)
    compile: bool = False        # torch.compile our model's hidden() (CUDA; shapes vary, so dynamic=True)
    out: str = ""                # write the results as JSON here


def parse_args(argv) -> Bench:
    from seal import parse_overrides  # the project's one --key=value parser (typed, unknown keys refused)
    return parse_overrides(Bench(), argv)


def arc_like(cfg: Bench, vocab: int):
    """Random token ids of mixed lengths, like ARC leave-one-out tasks: long prompts, short-to-medium answers."""
    g = torch.Generator().manual_seed(cfg.seed)
    n = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
    ids = lambda k: torch.randint(3, vocab, (k,), generator=g).tolist()
    return [(ids(n(cfg.prompt_min, cfg.prompt_max)), ids(n(cfg.completion_min, cfg.completion_max)))
            for _ in range(cfg.examples)]


def build_models(cfg: Bench, device, dtype):
    """Our Transformer and transformers' model holding identical weights."""
    import transformers
    if cfg.model:
        path = model_lib.resolve(cfg.model)
        ours, _ = model_lib.load(str(path), device=device, dtype=dtype)
        ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    else:
        torch.manual_seed(cfg.seed)
        ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOLLM2_135M))  # init std 0.02
        ours = model_lib.Transformer(model_lib.Config.from_hf(SMOLLM2_135M))
        ours.load_state_dict(ref.state_dict(), strict=True)
        for m in (ref, ours):  # cast the weights only: the rotary inv_freq buffers stay fp32, as load() keeps them
            for p in m.parameters():
                p.data = p.data.to(device, dtype)
            m.to(device)
    ref.config.use_cache = False
    return ours.requires_grad_(False), ref.requires_grad_(False)


class Baseline:
    """transformers + PEFT, a plain loop: right-pad to the longest example, labels -100 outside the completion."""

    def __init__(self, ref, cfg: Bench, total_steps):
        import peft
        import transformers
        self.model = peft.get_peft_model(ref, peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=0.0,
                                                              target_modules=list(TARGETS), task_type="CAUSAL_LM"))
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.pad = ref.config.eos_token_id if ref.config.eos_token_id is not None else 0
        self.cfg, self.total_steps = cfg, total_steps
        self.reset()

    def reset(self):
        """B = 0 and a fresh optimizer and schedule (after the warm-up step)."""
        import transformers
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if "lora_B" in name:
                    p.zero_()
        self.opt = torch.optim.AdamW(self.params, lr=self.cfg.lr, weight_decay=0.0)
        self.sched = transformers.get_cosine_schedule_with_warmup(self.opt, self.cfg.warmup, self.total_steps)

    def step(self, batch, device):
        width = max(len(p) + len(c) for p, c in batch)
        ids = torch.full((len(batch), width), self.pad, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        attn = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (p, c) in enumerate(batch):
            seq = torch.tensor(p + c)
            ids[i, :len(seq)], attn[i, :len(seq)] = seq, 1
            labels[i, len(p):len(seq)] = seq[len(p):]
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


def main(cfg: Bench):
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    if cfg.threads and device == "cpu":
        torch.set_num_threads(cfg.threads)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    print(f"device {device} ({torch.get_num_threads()} threads), base dtype {dtype}, LoRA r{cfg.r} a{cfg.alpha:g} "
          f"on {','.join(TARGETS)}, bs {cfg.batch_size}")
    ours, ref = build_models(cfg, device, dtype)
    data = arc_like(cfg, ours.config.vocab_size)
    plan = lora.batches(len(data), cfg.batch_size, 1, cfg.seed)  # lora.train draws the same plan from the seed
    real = sum(len(p) + len(c) for p, c in data)

    adapter = lora.inject(ours, cfg.r, cfg.alpha, TARGETS, seed=cfg.seed)
    base = Baseline(ref, cfg, len(plan))
    if cfg.compile:
        ours.hidden = torch.compile(ours.hidden, dynamic=True)
    short = [(data[0][0][:64], data[0][1][:16])] * cfg.batch_size  # warm-up step for both: allocator, kernels
    lora.train(ours, short, lr=cfg.lr, batch_size=cfg.batch_size, adapter=adapter)
    adapter.reset()
    base.step(short, device)
    base.reset()

    # Our train() runs the whole plan; after each of our steps, on_step runs the baseline's step on the same batch.
    # The callback's time is subtracted from ours, so each side is timed on its own work, interleaved.
    theirs = {"seconds": 0.0, "padded": 0, "losses": []}

    def baseline_step(step, loss, lr):
        sync()
        t0 = time.perf_counter()
        l, padded = base.step([data[i] for i in plan[step]], device)
        sync()
        theirs["seconds"] += time.perf_counter() - t0
        theirs["padded"] += padded
        theirs["losses"].append(l)
        print(f"  step {step + 1}/{len(plan)}: {sum(len(p) + len(c) for p, c in (data[i] for i in plan[step]))} "
              f"real tokens, loss ours {loss:.4f} theirs {l:.4f}", flush=True)

    t0 = time.perf_counter()
    res = lora.train(ours, data, lr=cfg.lr, batch_size=cfg.batch_size, warmup=cfg.warmup, schedule="cosine",
                     seed=cfg.seed, adapter=adapter, on_step=baseline_step)
    sync()
    ours_s = time.perf_counter() - t0 - theirs["seconds"]
    assert res.failed is None and res.tokens == real, (res.failed, res.tokens, real)

    n_lora = sum(p.numel() for p in adapter.params())
    result = {
        "device": device if device == "cpu" else torch.cuda.get_device_name(), "threads": torch.get_num_threads(),
        "model": cfg.model or "random SmolLM2-135M shape", "dtype": str(dtype), "examples": len(data),
        "steps": len(plan), "real_tokens": real, "padded_tokens_baseline": theirs["padded"],
        "padding_share_baseline": 1 - real / theirs["padded"],
        "ours_seconds": ours_s, "theirs_seconds": theirs["seconds"],
        "ours_tok_s": real / ours_s, "theirs_tok_s": real / theirs["seconds"],
        "speedup": theirs["seconds"] / ours_s,
        "first_loss_ours": res.losses[0], "first_loss_theirs": theirs["losses"][0],  # B=0: both are the base model
        "lora_params": n_lora, "config": asdict(cfg)}
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        if peak:
            fpt = flops_per_token(ours, n_lora)
            result["mfu_ours"] = result["ours_tok_s"] * fpt / (peak * 1e12)
            result["mfu_theirs"] = result["theirs_tok_s"] * fpt / (peak * 1e12)

    print(f"\n{len(plan)} steps, {real} real tokens; the padded baseline computes {theirs['padded']} "
          f"({100 * result['padding_share_baseline']:.1f}% padding)")
    print(f"{'':24}{'seconds':>10}{'real tok/s':>12}" + (f"{'MFU':>8}" if "mfu_ours" in result else ""))
    for who, key in (("ours (packed)", "ours"), ("transformers+PEFT (pad)", "theirs")):
        mfu = f"{100 * result['mfu_' + key]:7.1f}%" if "mfu_ours" in result else ""
        print(f"{who:24}{result[key + '_seconds']:10.1f}{result[key + '_tok_s']:12.1f}{mfu}")
    print(f"speedup {result['speedup']:.2f}x; first-step loss ours {res.losses[0]:.4f} vs theirs "
          f"{theirs['losses'][0]:.4f}")
    if cfg.out:
        from pathlib import Path
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {cfg.out}")
    return result


if __name__ == "__main__":
    main(parse_args(sys.argv[1:]))
