"""
LoRA adapters and the small fine-tuning loop that SEAL runs thousands of times.

SEAL's inner loop (paper §3, docs/official.md §1.5) turns every self-edit into a tiny LoRA fine-tune of one shared
model: inject once, then for each self-edit `adapter.reset()` and `train(...)`, all in memory. The M-step
(docs/official.md §1.7) is the same `train` on (prompt, self-edit) pairs with a fresh r=16 adapter, followed by
`adapter.merge()`.

    adapter = inject(m, r=128, alpha=16, targets=("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"))
    for edit in self_edits:
        adapter.reset()                       # B = 0, A = the same initial A (as the official run's reset_lora)
        res = train(m, examples, lr=edit.lr, epochs=edit.epochs, warmup=11)   # bs 2, cosine, AdamW, clip 1.0
    adapter.save("out/adapter")                # PEFT format: peft.PeftModel.from_pretrained reads it

Dtype policy: the base weights stay in their own dtype (bf16 on GPU, fp32 on CPU); LoRA weights, their gradients and
the optimizer state are fp32, as PEFT's autocast_adapter_dtype keeps them in the official run. The branch itself
computes in the base dtype from those fp32 masters (mixed-precision training; PEFT computes it in fp32).
"""
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

PEFT_PREFIX = "base_model.model."  # PEFT's key prefix: PeftModel.base_model (LoraModel).model (the hub model)


class LoRALinear(nn.Module):
    """y = base(x) + (alpha/r) * B(A(dropout(x))), with base frozen and A, B kept in fp32 (Hu et al. 2021, eq. 3)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base, self.r, self.alpha, self.scale = base, r, alpha, alpha / r
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.zeros(r, base.in_features, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=dev, dtype=torch.float32))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def forward(self, x):
        y = self.base(x)
        if self.merged:
            return y
        # The branch runs in the base weights' dtype from the fp32 masters, as mixed-precision training does: on
        # bf16 runs its products run at bf16's rate (on a GPU's tensor cores, with AVX-512 BF16 on a CPU) instead
        # of fp32's, and the layer input is used as it is, with no fp32 copy of it per target (docs/speed.md,
        # "The inner loop at the presets' shapes"). The gradients reach the fp32 masters through the casts.
        # On fp32 runs the casts are no-ops.
        dt = y.dtype
        z = F.linear(self.dropout(x.to(dt)), self.lora_A.to(dt))
        # One GEMM computes y + scale * z @ B^T, rounded once: no separate passes to scale and add over the (T, out)
        # output (with r=128 on 5 targets those passes were ~5% of a CPU step).
        return torch.addmm(y.flatten(0, -2), z.flatten(0, -2), self.lora_B.to(dt).t(), alpha=self.scale).view_as(y)

    @torch.no_grad()
    def merge(self):
        """Fold scale * B @ A into the base weight (computed in fp32, stored in the base dtype); skip the branch."""
        if not self.merged:
            w = self.base.weight
            w.copy_((w.float() + self.scale * (self.lora_B @ self.lora_A)).to(w.dtype))
            self.merged = True


def _draw_A(modules, seed):
    """Kaiming-uniform with a=sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)), as PEFT initialises lora_A. Drawn on the
    CPU in module order from one seeded generator, so the same seed gives the same A on every device."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for mod in modules:
        a = torch.empty(mod.lora_A.shape)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)
        out.append(a.to(mod.lora_A.device))
    return out


class Adapter:
    """The LoRA modules injected into one model, addressed by their module names (the hub's, hence PEFT's)."""

    def __init__(self, model, modules: dict, r, alpha, targets, dropout, seed):
        self.model, self.modules = model, modules
        self.r, self.alpha, self.targets, self.dropout = r, alpha, tuple(targets), dropout
        self.init_A = _draw_A(modules.values(), seed)  # kept: reset() restores exactly this A
        self.reset()

    def params(self) -> list:
        self._check_live()
        return [p for mod in self.modules.values() for p in (mod.lora_A, mod.lora_B)]

    @torch.no_grad()
    def reset(self, seed=None):
        """In place: B = 0 and A = the A drawn at injection (or a fresh A drawn from `seed`). Grads are dropped."""
        self._check_live()
        new_A = self.init_A if seed is None else _draw_A(self.modules.values(), seed)
        for mod, a in zip(self.modules.values(), new_A):
            mod.lora_A.copy_(a)
            mod.lora_B.zero_()
            mod.lora_A.grad = mod.lora_B.grad = None

    def state_dict(self) -> dict:
        """A plain dict of fp32 tensors (copies) under PEFT's saved key names."""
        self._check_live()
        sd = {}
        for name, mod in self.modules.items():
            sd[f"{PEFT_PREFIX}{name}.lora_A.weight"] = mod.lora_A.detach().clone()
            sd[f"{PEFT_PREFIX}{name}.lora_B.weight"] = mod.lora_B.detach().clone()
        return sd

    @torch.no_grad()
    def load_state_dict(self, sd: dict):
        """Copy a state_dict() (or a PEFT adapter file's tensors) in place; every key and shape must match."""
        self._check_live()
        own = {k: p for name, mod in self.modules.items()
               for k, p in ((f"{PEFT_PREFIX}{name}.lora_A.weight", mod.lora_A),
                            (f"{PEFT_PREFIX}{name}.lora_B.weight", mod.lora_B))}
        missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
        if missing or unexpected:
            raise KeyError(f"adapter keys differ: missing {missing[:3]}, unexpected {unexpected[:3]}")
        for k, p in own.items():
            if tuple(sd[k].shape) != tuple(p.shape):
                raise ValueError(f"{k}: shape {tuple(sd[k].shape)}, expected {tuple(p.shape)}")
            p.copy_(sd[k])

    def merge(self):
        """Merge every adapter into its base weight and put the plain nn.Linear back (checkpoint.save then works)."""
        for mod in self.modules.values():
            mod.merge()
        self.remove()

    def remove(self):
        """Unwrap without merging: the model is the base model again and this Adapter is spent."""
        self._check_live()
        for name, mod in self.modules.items():
            parent_name, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent_name), child, mod.base)
        self.modules = None

    def save(self, out_dir, base_model_name_or_path=None):
        """Write adapter_model.safetensors + adapter_config.json as PEFT's save_pretrained does."""
        from safetensors.torch import save_file
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        config = {  # the LoraConfig fields that change the math; PEFT fills every other field with its default
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
            "r": self.r, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
            "target_modules": sorted({n.rpartition(".")[2] for n in self.modules}),
            "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
            "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}}
        (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
        save_file({k: v.cpu().contiguous() for k, v in self.state_dict().items()},
                  str(out / "adapter_model.safetensors"), metadata={"format": "pt"})

    def _check_live(self):
        if self.modules is None:
            raise RuntimeError("this adapter was merged or removed; inject a new one")


def inject(model, r: int, alpha: float, targets=("q_proj", "v_proj"), dropout=0.0, seed=0) -> Adapter:
    """Wrap every nn.Linear child named in `targets` (PEFT's default for Llama/Qwen2 is q_proj, v_proj) and freeze
    all base parameters. A model that already carries LoRA wrappers is refused: reuse its Adapter (reset() between
    inner loops), or merge()/remove() it first. Silently stacking or replacing adapters would hide bugs."""
    if any(isinstance(mod, LoRALinear) for mod in model.modules()):
        raise RuntimeError("the model already has LoRA wrappers: reset, merge or remove its Adapter first")
    model.requires_grad_(False)
    found = {}
    for name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                found[f"{name}.{child_name}" if name else child_name] = lora = LoRALinear(child, r, alpha, dropout)
                setattr(parent, child_name, lora)
    if not found:
        raise ValueError(f"no nn.Linear named any of {targets} in the model")
    return Adapter(model, found, r, alpha, targets, dropout, seed)


def load_peft(model, adapter_dir) -> Adapter:
    """Inject an adapter saved by PEFT (or by Adapter.save) into `model` and load its weights."""
    from safetensors.torch import load_file
    d = Path(adapter_dir)
    cfg = json.loads((d / "adapter_config.json").read_text())
    unsupported = {"peft_type": "LORA", "bias": "none", "use_dora": False, "use_rslora": False,
                   "fan_in_fan_out": False, "lora_bias": False, "rank_pattern": {}, "alpha_pattern": {},
                   "layers_to_transform": None, "modules_to_save": None}
    for k, want in unsupported.items():
        if cfg.get(k, want) not in (want, None, {}, []):
            raise ValueError(f"adapter_config.json: {k}={cfg[k]!r} is not supported (only {want!r})")
    targets = cfg.get("target_modules")
    if not isinstance(targets, list):  # PEFT also allows a regex string, or null for per-architecture defaults
        raise ValueError(f"adapter_config.json: target_modules={targets!r} must be a list of module names")
    adapter = inject(model, cfg["r"], cfg["lora_alpha"], targets, cfg.get("lora_dropout", 0.0))
    adapter.load_state_dict(load_file(str(d / "adapter_model.safetensors")))
    return adapter


# -----------------------------------------------------------------------------
# Optimizer, clipping, schedules: the HF Trainer's defaults written out (docs/official.md §1.5: adamw_torch, clip 1.0)

class AdamW:
    """torch.optim.AdamW's update (Loshchilov & Hutter 2019: Adam with decoupled weight decay, bias-corrected),
    with fp32 state, through torch's fused kernel (`torch._fused_adamw_`, what AdamW(fused=True) calls): one pass
    over each tensor reads p, g, m, v and writes p, m, v. The seven _foreach passes it replaced took 34 ms of a
    knowledge-preset step over its 420 adapter tensors on this CPU, the fused pass 9 ms (docs/speed.md)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        self.params = [p for p in params if p.requires_grad]
        if any(p.dtype != torch.float32 for p in self.params):
            raise TypeError("AdamW here updates fp32 parameters only (the LoRA weights)")
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.t = 0  # one step count for all params: they all get a gradient at every step
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self._t = {}  # the step count as the fused kernel reads it: one fp32 scalar tensor per device

    @torch.no_grad()
    def step(self):
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not live:
            return
        self.t += 1
        b1, b2 = self.betas
        for dev in {self.params[i].device for i in live}:
            at = [i for i in live if self.params[i].device == dev]
            t = self._t.setdefault(dev, torch.zeros((), device=dev))
            t.fill_(self.t)
            torch._fused_adamw_([self.params[i] for i in at], [self.params[i].grad for i in at],
                                [self.m[i] for i in at], [self.v[i] for i in at], [], [t] * len(at),
                                lr=self.lr, beta1=b1, beta2=b2, weight_decay=self.weight_decay, eps=self.eps,
                                amsgrad=False, maximize=False)

    def zero_grad(self):
        for p in self.params:
            p.grad = None


def clip_grad_norm(params, max_norm=1.0) -> torch.Tensor:
    """Scale all grads so their global L2 norm is at most max_norm; return the norm before clipping (a tensor: no
    host sync). Same arithmetic as torch.nn.utils.clip_grad_norm_, including its 1e-6."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    torch._foreach_mul_(grads, torch.clamp(max_norm / (total + 1e-6), max=1.0))
    return total


def lr_at(step: int, total: int, base_lr: float, warmup: int = 0, kind: str = "cosine") -> float:
    """The learning rate of optimizer step `step` (0-based), as transformers' get_{cosine,linear,constant}_schedule_
    with_warmup give it: linear warmup from 0 (so step 0 has lr 0 when warmup > 0), then half a cosine to 0, a
    straight line to 0 at `total`, or flat."""
    if step < warmup:
        return base_lr * step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "cosine":
        return base_lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    if kind == "linear":
        return base_lr * max(0.0, 1.0 - progress)
    if kind == "constant":
        return base_lr
    raise ValueError(f"unknown schedule {kind!r} (cosine, linear or constant)")


# -----------------------------------------------------------------------------
# Packing and the training loop

def keep_freed_memory():
    """On Linux with glibc, keep freed memory in the process instead of handing it back to the kernel. glibc maps
    each large block (above its mmap threshold) afresh and unmaps it on free, and trims the heap's free top: every
    training step's (T, vocab) logits and large gradients then come back as new pages that the kernel must fault in
    and zero. That cost ~140 ms of a ~1.1 s knowledge-preset step on this CPU (docs/speed.md). Blocks up to 32 MB
    (glibc's ceiling for the threshold) now come from the heap, and the heap is not trimmed. Once per process."""
    global _kept
    if _kept:
        return
    _kept = True
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)     # M_MMAP_THRESHOLD
        libc.mallopt(-1, 2 ** 31 - 1)  # M_TRIM_THRESHOLD: the largest value, never trim in practice
    except (OSError, AttributeError):  # not glibc: nothing to set
        pass


_kept = False


@dataclass
class Packed:
    idx: torch.Tensor      # (1, T) token ids of all documents, back to back
    doc_ids: torch.Tensor  # (1, T) which document each token belongs to
    doc_lens: list         # the documents' lengths (model.hidden runs attention per document with them)
    pos: torch.Tensor      # (N,) positions whose next token is a target
    targets: torch.Tensor  # (N,) those next tokens


def pack(examples, loss_on="completion", device="cpu") -> Packed:
    """One row, no padding. Targets never cross a document boundary: a document's last token predicts nothing."""
    idx, docs, pos, targets, lens = [], [], [], [], []
    for d, (prompt, completion) in enumerate(examples):
        seq = list(prompt) + list(completion)
        first = 1 if loss_on == "all" else max(len(prompt), 1)  # index of the first token that is a target
        pos += range(len(idx) + first - 1, len(idx) + len(seq) - 1)
        targets += seq[first:]
        idx += seq
        docs += [d] * len(seq)
        lens.append(len(seq))
    row = lambda x: torch.tensor([x], dtype=torch.long, device=device)
    return Packed(row(idx), row(docs), lens, row(pos)[0], row(targets)[0])


def packed_loss(model, p: Packed) -> torch.Tensor:
    """Token-mean cross-entropy over the row's targets. The vocab projection runs only at target positions: for ARC
    completions that is a few % of the tokens, and the (T, vocab) logits tensor is never built."""
    return F.cross_entropy(model.packed_logits(p.idx, p.doc_lens, p.pos), p.targets)


def n_targets(example, loss_on) -> int:
    prompt, completion = example
    n = len(prompt) + len(completion)
    return max(n - 1, 0) if loss_on == "all" else min(len(completion), n - 1)


def batches(n: int, batch_size: int, epochs: int, seed: int) -> list:
    """Index lists, one per step: each epoch is a fresh permutation from one generator seeded once."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g).tolist()
        out += [perm[i:i + batch_size] for i in range(0, n, batch_size)]
    return out


@dataclass
class TrainResult:
    steps: int = 0
    tokens: int = 0            # real tokens seen (all of them are real: there is no padding)
    target_tokens: int = 0     # tokens the loss was taken on
    losses: list = field(default_factory=list)  # one per step
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    dropped: int = 0           # longer than max_len, or with nothing to predict
    failed: str | None = None  # a non-finite loss or gradient: the params were restored, the caller scores 0

    def loss_ends(self) -> dict:
        """The first and the last step's loss (None when no step ran): what a record keeps of the loss curve."""
        return {"loss_first": self.losses[0] if self.losses else None,
                "loss_last": self.losses[-1] if self.losses else None}


def train(model, examples, *, lr, epochs=1, batch_size=2, loss_on="completion", warmup=0, schedule="cosine",
          weight_decay=0.0, max_grad_norm=1.0, max_len=8192, seed=0, adapter=None, params=None,
          on_step=None, target_loss=None) -> TrainResult:
    """Fine-tune the trainable params (the adapter's, else params, else every param with requires_grad) on
    (prompt_ids, completion_ids) examples. Each step packs its batch_size examples into one row. The official run
    pads each batch to its longest example and trains on the padding too (docs/official.md §1.5); packing spends no
    FLOPs on pads and keeps the loss on real tokens only. Nothing is written to disk.
    on_step(step, loss, lr) is called after every optimizer step. target_loss: stop after the first epoch whose
    mean step loss is at or below it, so `epochs` is the most (the schedule still spans all of them)."""
    if loss_on not in ("completion", "all"):
        raise ValueError(f"loss_on={loss_on!r} (completion or all)")
    params = adapter.params() if adapter is not None else model.parameters() if params is None else params
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires grad (inject an adapter first?)")
    kept = [e for e in examples if len(e[0]) + len(e[1]) <= max_len and n_targets(e, loss_on) > 0]
    res = TrainResult(dropped=len(examples) - len(kept))
    if not kept or epochs <= 0:
        return res
    plan = batches(len(kept), batch_size, epochs, seed)
    per_epoch = len(plan) // epochs  # optimizer steps in an epoch
    device = params[0].device
    if device.type == "cpu":
        keep_freed_memory()
    start = [p.detach().clone() for p in params]  # restored if the run blows up
    opt = AdamW(params, lr=lr, weight_decay=weight_decay)
    was_training = model.training
    model.train()
    t0 = time.perf_counter()
    try:
        with torch.enable_grad():
            for step, ids in enumerate(plan):
                packed = pack([kept[i] for i in ids], loss_on, device)
                loss = packed_loss(model, packed)
                loss.backward()
                norm = clip_grad_norm(params, max_grad_norm if max_grad_norm else math.inf)
                loss_f, norm_f = torch.stack([loss.detach(), norm.to(loss.device)]).tolist()  # the one host sync
                if not (math.isfinite(loss_f) and math.isfinite(norm_f)):
                    res.failed = f"non-finite {'loss' if not math.isfinite(loss_f) else 'grad norm'} at step {step}"
                    break
                opt.lr = lr_at(step, len(plan), lr, warmup, schedule)
                opt.step()
                opt.zero_grad()
                res.steps += 1
                res.tokens += packed.idx.shape[1]
                res.target_tokens += len(packed.targets)
                res.losses.append(loss_f)
                if on_step is not None:
                    on_step(step, loss_f, opt.lr)
                if target_loss is not None and res.steps % per_epoch == 0 and (
                        sum(res.losses[-per_epoch:]) / per_epoch <= target_loss):
                    break  # the epoch that just ended fit the data well enough
        if res.failed is None and not math.isfinite(torch.stack(torch._foreach_norm(params)).sum().item()):
            res.failed = f"non-finite params after step {res.steps - 1}"  # the last update blew up
        if res.failed is not None:
            with torch.no_grad():
                torch._foreach_copy_(params, start)
            opt.zero_grad()
    finally:
        model.train(was_training)
    res.seconds = time.perf_counter() - t0
    res.tokens_per_s = res.tokens / res.seconds if res.seconds > 0 else 0.0
    return res
