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
    checkpoint.save_adapter(adapter, "out/adapter")   # PEFT format: peft.PeftModel.from_pretrained reads it

Dtype policy: base weights in their own dtype (bf16 on GPU, fp32 on CPU); LoRA weights, gradients and optimizer state
in fp32, as the official run's PEFT keeps them; the branch computes in the base dtype from those fp32 masters.
"""
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

import settings

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
        self.cast = None  # (dtype, A, B): the factors cast for decoding, kept while they do not change (factors())
        self.hooked = None  # ids of the factors whose gradients drop the casts (a copy's factors are new tensors)

    def forward(self, x):
        y = self.base(x)
        if self.merged:
            return y
        # The branch runs in the base weights' dtype from the fp32 masters, as mixed-precision training does: bf16's
        # rate for its products and no fp32 copy of the input per target (docs/speed.md, "The inner loop at the
        # presets' shapes"); the gradients reach the fp32 masters through the casts. On fp32 runs they are no-ops.
        dt = y.dtype
        A, B = self.factors(dt)
        z = F.linear(self.dropout(x.to(dt)), A)
        # One GEMM for y + scale * z @ B^T: no separate passes over the (T, out) output (~5% of a CPU step at r=128)
        return torch.addmm(y.flatten(0, -2), z.flatten(0, -2), B.t(), alpha=self.scale).view_as(y)

    def factors(self, dt):
        """lora_A and lora_B in dtype dt. Training casts afresh; decoding casts once and keeps the casts (anew: ~0.6 GB
        a step at 1B, r128), dropped when a gradient reaches a factor (before any step), by changed(), and not kept
        while a gradient is pending."""
        A, B = self.lora_A, self.lora_B
        if self.hooked != (id(A), id(B)):  # any optimizer's step comes after a gradient: drop the casts then
            for p in (A, B):
                p.register_post_accumulate_grad_hook(self.changed)
            self.hooked, self.cast = (id(A), id(B)), None
        if dt == A.dtype or torch.is_grad_enabled() or A.grad is not None or B.grad is not None:
            return A.to(dt), B.to(dt)
        if self.cast is None or self.cast[0] != dt:
            self.cast = (dt, A.detach().to(dt), B.detach().to(dt))
        return self.cast[1:]

    def changed(self, *_):
        """The factors were (or are about to be) written: the next decoding step casts them again."""
        self.cast = None

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
            mod.changed()

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
        for mod in self.modules.values():
            mod.changed()

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


# -----------------------------------------------------------------------------
# Optimizer, clipping, schedules: the HF Trainer's defaults written out (docs/official.md §1.5: adamw_torch, clip 1.0)

class AdamW:
    """torch.optim.AdamW's update (Loshchilov & Hutter 2019, Algorithm 2) written out in `step` in _foreach ops, fp32
    state: bit for bit torch.optim.AdamW(foreach=True). fused=True hands it to torch.optim.AdamW(fused=True): ~20 ms
    less a knowledge-preset step (docs/speed.md), equal within 1e-6; lora.train uses it, as every result in docs/."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, fused=False):
        self.params = [p for p in params if p.requires_grad]
        if any(p.dtype != torch.float32 for p in self.params):
            raise TypeError("AdamW here updates fp32 parameters only (the LoRA weights)")
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.t = 0  # one step count for all params: they all get a gradient at every step
        self.fused = (torch.optim.AdamW(self.params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)
                      if fused else None)
        self.m = [] if fused else [torch.zeros_like(p) for p in self.params]  # first moment
        self.v = [] if fused else [torch.zeros_like(p) for p in self.params]  # second moment

    @torch.no_grad()
    def step(self):
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not live:
            return
        self.t += 1
        if self.fused is not None:
            self.fused.param_groups[0]["lr"] = self.lr
            self.fused.step()
            return
        w, g = [self.params[i] for i in live], [self.params[i].grad for i in live]
        m, v = [self.m[i] for i in live], [self.v[i] for i in live]
        b1, b2 = self.betas
        if self.weight_decay:
            torch._foreach_mul_(w, 1 - self.lr * self.weight_decay)  # decoupled: shrinks w, never enters m or v
        torch._foreach_lerp_(m, g, 1 - b1)                           # m = b1 m + (1 - b1) g
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, g, g, 1 - b2)                     # v = b2 v + (1 - b2) g^2
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, math.sqrt(1 - b2 ** self.t))
        torch._foreach_add_(denom, self.eps)                         # sqrt(v / (1 - b2^t)) + eps
        torch._foreach_addcdiv_(w, m, denom, -self.lr / (1 - b1 ** self.t))  # w -= lr m / (1 - b1^t) / denom

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


@torch.no_grad()
def completion_scores(model, examples) -> list:
    """Teacher-forced scores of each (prompt, completion) in one packed forward pass: the completion's tokens the
    argmax predicts (given the prompt and the true tokens before them), its token count and summed log-likelihood.
    Both domains' graded rewards read these (ARC's token accuracy, knowledge's answer log-likelihood)."""
    device = next(model.parameters()).device
    p = pack(examples, "completion", device)
    logp = torch.log_softmax(model.packed_logits(p.idx, p.doc_lens, p.pos).float(), -1)
    doc, n = p.doc_ids[0, p.pos], len(examples)
    per_doc = lambda x: torch.zeros(n, device=device).index_add_(0, doc, x.float()).tolist()
    right = per_doc(logp.argmax(-1) == p.targets)
    loglik = per_doc(logp.gather(1, p.targets[:, None])[:, 0])
    tokens = torch.bincount(doc, minlength=n).tolist()
    return [{"right": int(r), "tokens": t, "loglik": ll} for r, t, ll in zip(right, tokens, loglik)]


def n_targets(example, loss_on) -> int:
    n = len(example[0]) + len(example[1])  # (prompt, completion)
    return max(n - 1, 0) if loss_on == "all" else min(len(example[1]), n - 1)


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
    """Fine-tune the trainable params (the adapter's, else params, else all with requires_grad) on (prompt_ids,
    completion_ids) examples, each step's batch packed into one row: no FLOPs or loss on pads, which the official run
    trains (docs/official.md §1.5). Nothing is written to disk. on_step(step, loss, lr) follows every step.
    target_loss: stop after the first epoch whose mean loss reaches it (`epochs` is the most; the schedule spans all)."""
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
        settings.keep_freed_memory()
    start = [p.detach().clone() for p in params]  # restored if the run blows up
    opt = AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
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
