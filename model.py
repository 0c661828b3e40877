"""
One-file Llama / Qwen2 transformer for Hugging Face hub checkpoints (checkpoint.py loads and saves them).

The module layout and parameter names are the hub's own (model.layers.N.self_attn.q_proj, ...), so a
checkpoint's state dict maps onto this model one to one and LoRA targets carry the names PEFT uses.
One forward serves training (optionally on packed rows of several documents) and generation (with a
preallocated KV cache).

    m, tok = checkpoint.load("smollm2-135m")         # offline default, or a folder, or a hub repo id
    logits = m(torch.tensor([tok.encode("Hello")]))  # (B, T, vocab), fp32
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Config: read from the checkpoint's own config.json; no per-model table.

SUPPORTED_ROPE = (None, "default", "llama3")


@dataclass
class Config:
    model_type: str = "llama"          # "llama" (Llama 2/3.x, SmolLM) or "qwen2" (Qwen2 / Qwen2.5)
    vocab_size: int = 32000
    dim: int = 4096                     # hidden_size
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32                # < n_heads means grouped-query attention
    head_dim: int = 128
    ffn_dim: int = 11008                # intermediate_size
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None    # None or the llama3 dict (factor, low/high_freq_factor, original_max_...)
    tie_embeddings: bool = False
    qkv_bias: bool = False              # Qwen2 has biases on q, k, v
    max_seq_len: int = 8192
    extra: dict = field(default_factory=dict)  # token ids etc., carried through to_hf() untouched

    @classmethod
    def from_hf(cls, d: dict) -> "Config":
        """Build from a hub config.json dict; refuse anything that would change the math silently."""
        mt = d.get("model_type")
        if mt is None:
            raise ValueError("config.json has no 'model_type' (expected 'llama' or 'qwen2')")
        if mt not in ("llama", "qwen2"):
            raise ValueError(f"model_type={mt!r} is not supported (supported: 'llama', 'qwen2')")
        for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            if k not in d:
                raise ValueError(f"config.json is missing {k!r}")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={d['hidden_act']!r} is not supported (only 'silu')")
        if d.get("mlp_bias"):
            raise ValueError("mlp_bias=true is not supported")
        if mt == "qwen2" and d.get("use_sliding_window"):
            raise ValueError("use_sliding_window=true is not supported (sliding-window attention)")
        if d.get("qk_norm") or d.get("use_qk_norm"):
            raise ValueError("qk_norm is not supported")
        # Older configs keep rope_theta / rope_scaling at the top level; newer transformers writes rope_parameters.
        rp = d.get("rope_parameters") or {}
        scaling = d.get("rope_scaling") or (rp if rp.get("rope_type", "default") != "default" else None)
        rope_type = None if scaling is None else scaling.get("rope_type", scaling.get("type"))
        if rope_type not in SUPPORTED_ROPE:
            raise ValueError(f"rope_scaling type {rope_type!r} is not supported (supported: llama3)")
        theta = d.get("rope_theta", rp.get("rope_theta", 10000.0))
        n_heads = d["num_attention_heads"]
        keep = ("bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "max_position_embeddings")
        return cls(
            model_type=mt, vocab_size=d["vocab_size"], dim=d["hidden_size"], n_layers=d["num_hidden_layers"],
            n_heads=n_heads, n_kv_heads=d.get("num_key_value_heads") or n_heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // n_heads, ffn_dim=d["intermediate_size"],
            norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
            rope_scaling={k: v for k, v in scaling.items() if k != "rope_theta"} if rope_type == "llama3" else None,
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=(mt == "qwen2") or bool(d.get("attention_bias", False)),
            max_seq_len=d.get("max_position_embeddings", 8192),
            extra={k: d[k] for k in keep if k in d})

    def to_hf(self) -> dict:
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[self.model_type]
        d = {"architectures": [arch], "model_type": self.model_type, "vocab_size": self.vocab_size,
             "hidden_size": self.dim, "intermediate_size": self.ffn_dim, "num_hidden_layers": self.n_layers,
             "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim,
             "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling,
             "tie_word_embeddings": self.tie_embeddings, "hidden_act": "silu",
             "max_position_embeddings": self.max_seq_len}
        if self.model_type == "llama":
            d["attention_bias"] = self.qkv_bias
        return {**self.extra, **d}


# -----------------------------------------------------------------------------
# Rotary embeddings (rotate-half layout, as the hub checkpoints expect)

def rope_inv_freq(cfg: Config) -> torch.Tensor:
    # fp32 throughout, as the reference implementation computes it: float64 here would move logits by ~1e-4
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)
    s = cfg.rope_scaling
    if s is not None:  # llama3: slow down low frequencies by `factor`, keep high ones, blend in between
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = ((old / wavelen - lo) / (hi - lo)).clamp(0, 1)
        inv = (1 - smooth) * inv / factor + smooth * inv
    return inv


def apply_rope(x, cos, sin):
    # x: (B, H, T, hd); cos/sin: (B, 1, T, hd)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# -----------------------------------------------------------------------------
# KV cache: preallocated, one write index shared by all rows (prompts are left-padded)

# Device types whose prefill takes attention that flash kernels accept. Flash attention takes no mask, and a mask
# beside grouped-query attention falls to the math kernel on some torch versions, whose (B, H, T, T) scores are
# ~16 GB for the ARC paper's 32 prompts of ~2k tokens. So there a prefill with no padded row attends with
# is_causal, and a masked one gets K/V expanded to every query head (the memory-efficient kernel takes masks).
# The CPU keeps the masked GQA call its tests and tables were measured with.
PREFILL_FAST_ON = ("cuda",)

class Buffers:
    """Zeroed tensors that outlive a generate call: one buffer per name, grown to the largest shape asked (never
    shrunk), and each request a view of its leading corner. A CUDA graph replays fixed addresses: with the caches in
    these buffers, a compiled decoding step recorded once replays in every later call of the same shapes, instead of
    recording anew per call (after 128 re-records PyTorch silently runs it without graphs). The price is the largest
    cache asked for, kept for the model's life."""

    def __init__(self):
        self.buffers = {}

    def get(self, name, shape, dtype, device) -> torch.Tensor:
        buf = self.buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.device != torch.device(device) or buf.dim() != len(shape) or \
                any(s > b for s, b in zip(shape, buf.shape)):  # grown: every graph records once more
            big = shape if buf is None or buf.dim() != len(shape) else tuple(map(max, shape, buf.shape))
            buf = self.buffers[name] = torch.zeros(big, dtype=dtype, device=device)
        return buf[tuple(slice(0, s) for s in shape)].zero_()


class KVCache:
    def __init__(self, cfg: Config, batch: int, max_len: int, device=None, dtype=torch.float32, buffers=None):
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        new = (lambda name, shape, dt: torch.zeros(shape, device=device, dtype=dt)) if buffers is None else \
            (lambda name, shape, dt: buffers.get(name, shape, dt, device))
        self.k, self.v = new("prefix_k", shape, dtype), new("prefix_v", shape, dtype)
        self.valid = new("prefix_valid", (batch, max_len), torch.bool)  # False at pad slots (and past len)
        self.len = 0

    def repeat(self, n: int) -> "KVCache":
        """A new cache whose every row is repeated n times: prefill once, sample n continuations."""
        new = object.__new__(KVCache)
        new.k = self.k.repeat_interleave(n, dim=1)
        new.v = self.v.repeat_interleave(n, dim=1)
        new.valid = self.valid.repeat_interleave(n, dim=0)
        new.len = self.len
        return new

    def select(self, rows: torch.Tensor) -> "KVCache":
        """A new cache of the given rows only."""
        new = object.__new__(KVCache)
        new.k, new.v = self.k.index_select(1, rows), self.v.index_select(1, rows)
        new.valid, new.len = self.valid[rows], self.len
        return new

    def attend(self, layer, q, k, v, mask):
        """q: (B, H, T, hd), k/v: (B, KV, T, hd) of the new tokens, written at self.len (hidden() moves it on after
        the last layer); they attend over everything written so far, as mask (B, 1, T, len+T) allows."""
        end = self.len + k.shape[2]
        self.k[layer, :, :, self.len:end], self.v[layer, :, :, self.len:end] = k, v
        keys, values, gqa = self.k[layer, :, :, :end], self.v[layer, :, :, :end], q.shape[1] != k.shape[1]
        if mask is None:  # hidden() drops the mask only for a first prefill with no padded row: plain causal
            return F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=gqa)
        if gqa and q.device.type in PREFILL_FAST_ON:  # see PREFILL_FAST_ON
            keys, values = (t.repeat_interleave(q.shape[1] // k.shape[1], 1) for t in (keys, values))
            gqa = False
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa)


class DecodeCache:
    """Decoding n continuations of each of B prompts in lockstep, one token per step (cascade attention, as in
    Hydragen, Juravsky et al. 2024). The prompts' keys and values stay in their prefill KVCache, one row per
    prompt, and every step reads them once for all n samples instead of from n copies: for 8 self-edits of a
    500-token prompt that is 8x less cache traffic and memory. Only the new tokens' keys and values live in a
    (B*n)-row suffix, one tensor per layer (a step writes each in place; a step's write into one tensor of all
    layers may copy the whole of it). Shapes are static for torch.compile: a step writes at the device tensor
    `slot` (no host sync, no Python int that changes every step) and attends to the suffix up to `span`, rounded
    up to a multiple of SPAN_BUCKET, so a compiled step sees a handful of shapes, not one per token. The prompt
    part is read over the prefill cache's whole length, its slots past the prompts masked. `buffers` (a model's
    Buffers): the tensors are views of buffers kept across calls, at the same addresses (CUDA graphs)."""
    SPAN_BUCKET = 64

    def __init__(self, prefix: KVCache, n: int, max_new: int, next_pos: torch.Tensor, buffers=None):
        n_layers, B, n_kv, P, hd = prefix.k.shape
        dev, dt = prefix.k.device, prefix.k.dtype
        new = (lambda name, shape, t: torch.zeros(shape, device=dev, dtype=t)) if buffers is None else \
            (lambda name, shape, t: buffers.get(name, shape, t, dev))
        self.prefix, self.n, self.t = prefix, n, 0
        shape = (B * n, n_kv, max(max_new, 1), hd)
        self.k = [new(f"k{i}", shape, dt) for i in range(n_layers)]
        self.v = [new(f"v{i}", shape, dt) for i in range(n_layers)]
        self.prefix_keep = new("prefix_keep", (B * n, P), torch.bool)
        self.prefix_keep.copy_(prefix.valid.repeat_interleave(n, 0))  # False at left pads and past the prompts
        self.slot = new("slot", (1,), torch.long)
        self.pos = new("pos", (B * n, 1), torch.long)
        self.pos.copy_(next_pos)  # rotary position of the token fed next, moved on in place
        if dev.type == "cuda":  # CUDA graphs (compile_hot_paths) replay fixed addresses: these tensors never move
            for t in (*self.k, *self.v, self.slot, self.pos, self.prefix_keep, prefix.k, prefix.v):
                torch._dynamo.mark_static_address(t)

    def span(self) -> int:
        b = self.SPAN_BUCKET
        return min(self.k[0].shape[2], (self.t // b + 1) * b)

    def advance(self):
        self.t += 1
        self.slot += 1
        self.pos += 1

    def select(self, rows: torch.Tensor, prompts: torch.Tensor, n: int):
        """Keep only `rows` (B'*n indices into the current rows, each prompt's n' rows adjacent) of the prompts
        `prompts` (B' indices into the current prompts): decoding drops finished samples (sampling.generate_ids).
        New shapes, so not for a compiled or CUDA-graph step."""
        self.k, self.v = [t.index_select(0, rows) for t in self.k], [t.index_select(0, rows) for t in self.v]
        self.pos, self.prefix_keep, self.n = self.pos[rows], self.prefix_keep[rows], n
        self.prefix = self.prefix.select(prompts)

    def keep(self, span):
        """(B*n, 1, 1, P + span) bool: the prompt's real tokens and the samples' tokens written so far."""
        written = (torch.arange(span, device=self.slot.device) <= self.slot).expand(self.prefix_keep.shape[0], span)
        return torch.cat([self.prefix_keep, written], 1)[:, None, None]

    def attend(self, layer, q, k, v, keep):
        """q: (B*n, H, 1, hd), k/v: (B*n, KV, 1, hd) of the new tokens -> (B*n, H, 1, hd)."""
        Bn, H, _, hd = q.shape
        B, n, KV, P = Bn // self.n, self.n, k.shape[1], self.prefix_keep.shape[1]
        G, span = H // KV, keep.shape[-1] - P
        self.k[layer][:, :, self.slot] = k  # in place, at the device index (gpt-fast's form of the write)
        self.v[layer][:, :, self.slot] = v
        kp, vp = self.prefix.k[layer], self.prefix.v[layer]                      # (B, KV, P, hd)
        ks, vs = self.k[layer][:, :, :span], self.v[layer][:, :, :span]         # (B*n, KV, span, hd)
        q = q * hd ** -0.5
        # the n samples' queries of a prompt, stacked as one longer query against its keys: (B, KV, n*G, hd)
        q_shared = q.view(B, n, KV, G, hd).transpose(1, 2).reshape(B, KV, n * G, hd)
        s_prefix = (q_shared @ kp.transpose(-1, -2)).view(B, KV, n, G, P).transpose(1, 2).reshape(Bn, KV, G, P)
        s_suffix = q.view(Bn, KV, G, hd) @ ks.transpose(-1, -2)
        s = torch.cat([s_prefix, s_suffix], -1).float().masked_fill(~keep, float("-inf"))
        p_prefix, p_suffix = s.softmax(-1).to(q.dtype).split([P, span], -1)
        p_shared = p_prefix.view(B, n, KV, G, P).transpose(1, 2).reshape(B, KV, n * G, P)
        y = (p_shared @ vp).view(B, KV, n, G, hd).transpose(1, 2).reshape(Bn, KV, G, hd) + p_suffix @ vs
        return y.reshape(Bn, H, 1, hd)


# -----------------------------------------------------------------------------
# The transformer

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()  # fp32 statistics, whatever the weights' dtype
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


PACK_ON_CPU = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
PACKED_DTYPES = (torch.float32,) + ((torch.bfloat16,) if PACK_ON_CPU and torch.ops.mkldnn._is_mkldnn_bf16_supported()
                                    else ())  # bf16 where the CPU has the instructions (AVX-512 BF16, AMX)


class Linear(nn.Linear):
    """nn.Linear (same parameters and names, so checkpoints and PEFT keys are unchanged) with one CPU fast path:
    without grad, a product of a few rows (decoding: one row per sample) runs on a oneDNN-prepacked copy of the
    weight. For so few rows MKL's sgemm reads the transposed weight at about half the memory bandwidth; prepacked,
    a SmolLM2 layer runs 1.7x and the vocab projection 2.8x faster on one core. The copy is a cache, remade when
    the weight is replaced or written in place (its version counter moves, e.g. when an adapter is merged), and it
    costs a second copy of the weights in memory. bf16 weights too (1.5-2x faster than bf16's plain path for 2-8
    rows here: docs/gpu.md, "bf16 on a CPU"). Training, GPUs and compiled graphs take the plain path."""
    PACK_ROWS = (2, 256)  # one row is as fast unpacked; from a few hundred rows on, both run at the same speed
    _packed = _packed_key = None

    def forward(self, x):
        w = self.weight
        rows = x.numel() // x.shape[-1]
        if (not PACK_ON_CPU or x.device.type != "cpu" or w.dtype not in PACKED_DTYPES or torch.is_grad_enabled()
                or not self.PACK_ROWS[0] <= rows <= self.PACK_ROWS[1] or torch.compiler.is_compiling()):
            return F.linear(x, w, self.bias)
        key = (w.data_ptr(), w._version)
        if self._packed_key != key:
            self._packed, self._packed_key = torch.ops.mkldnn._reorder_linear_weight(w.detach(), None), key
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")

    def __getstate__(self):  # copies and pickles leave the cache behind (an opaque tensor that cannot be copied)
        return {k: v for k, v in self.__dict__.items() if k not in ("_packed", "_packed_key")}


class Attention(nn.Module):
    def __init__(self, cfg: Config, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        hd = cfg.head_dim
        self.q_proj = Linear(cfg.dim, cfg.n_heads * hd, bias=cfg.qkv_bias)
        self.k_proj = Linear(cfg.dim, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = Linear(cfg.dim, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = Linear(cfg.n_heads * hd, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache, doc_lens=None):
        B, T, _ = x.shape
        c = self.cfg
        q = self.q_proj(x).view(B, T, c.n_heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = c.n_kv_heads != c.n_heads  # each kv head serves n_heads // n_kv_heads queries, without copies
        if cache is not None:  # generation: a KVCache (prefill, fill-in sampling) or a DecodeCache (decoding step)
            y = cache.attend(self.layer_idx, q, k, v, mask)
        elif doc_lens is not None:  # a packed row: one causal attention per document, no (T, T) mask to pay for
            # bf16 on a CPU attends in fp32: PyTorch's CPU attention backward in bf16 ran 4x slower than in fp32 on
            # short documents (docs/gpu.md, "bf16 on a CPU")
            up = q.device.type == "cpu" and q.dtype == torch.bfloat16
            qs, ks, vs = ((t.float() if up else t).split(doc_lens, 2) for t in (q, k, v))
            y = torch.cat([F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=gqa)
                           for qd, kd, vd in zip(qs, ks, vs)], 2).to(q.dtype)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, c.n_heads * c.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.gate_proj = Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: Config, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, doc_lens=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, doc_lens)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):  # named `model` inside Transformer, as on the hub
    def __init__(self, cfg: Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # a plain attribute, not a buffer: m.to(bfloat16) must not round the rotary frequencies
        self.inv_freq = rope_inv_freq(cfg)

    def rotary(self, pos, dtype):
        """cos, sin (B, 1, T, head_dim) for rotary positions pos (B, T), computed in fp32."""
        freqs = pos[..., None].float() * self.inv_freq.to(pos.device)  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def hidden(self, idx, input_pos=None, cache=None, valid=None, doc_lens=None):
        """Final-normed hidden states (B, T, dim).

        input_pos: (B, T) rotary positions. Default: 0..T-1 (after cache.len with a cache), or restarting at
                   0 at every document when doc_lens is given.
        cache:     a KVCache; the new keys/values are written at cache.len and cache.len advances by T.
        valid:     (B, T) bool, False at left-padding tokens: no other token attends to them.
        doc_lens:  packing (training, lora.py): one row (B == 1) of several documents of these lengths. A token
                   attends only to earlier tokens of its own document, so the row computes exactly what each
                   document computes alone, with no pad tokens; attention runs per document, with no (T, T) mask.
        """
        B, T = idx.shape
        dev = idx.device
        if cache is not None and doc_lens is not None:
            raise ValueError("packing (doc_lens) is for training; it cannot be combined with a KV cache")
        if doc_lens is not None:
            if B != 1 or sum(doc_lens) != T:
                raise ValueError(f"doc_lens must cover one row exactly: sum {sum(doc_lens)} for shape {(B, T)}")
            if input_pos is None:
                input_pos = torch.cat([torch.arange(n, device=dev) for n in doc_lens])[None]
        start = cache.len if cache is not None else 0
        ar = torch.arange(T, device=dev)
        if input_pos is None:
            input_pos = (start + ar).expand(B, T)
        mask = None  # causal attention, unless a cache or left padding asks for a mask
        if cache is not None:
            cache.valid[:, start:start + T] = True if valid is None else valid
        plain_causal = (cache is not None and start == 0 and dev.type in PREFILL_FAST_ON
                        and (valid is None or bool(valid.all())))  # a first prefill, no row padded
        if (cache is not None or valid is not None) and not plain_causal:
            keys = cache.valid[:, :start + T] if cache is not None else valid
            q_idx = start + ar
            k_idx = torch.arange(keys.shape[1], device=dev)
            causal = k_idx[None, :] <= q_idx[:, None]
            # attending to itself keeps a pad token's row finite (an all-masked row would be NaN)
            mask = ((causal & keys[:, None, :]) | (k_idx[None, :] == q_idx[:, None]))[:, None]  # over heads
        if self.inv_freq.device != dev:  # moved once (a plain attribute: m.to(device) leaves it behind)
            self.inv_freq = self.inv_freq.to(dev)
        x = self.model.embed_tokens(idx)
        cos, sin = self.rotary(input_pos, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, cache, doc_lens)
        if cache is not None:
            cache.len += T
        return self.model.norm(x)

    def forward(self, idx, input_pos=None, cache=None, valid=None, doc_lens=None):
        return self.lm_head(self.hidden(idx, input_pos, cache, valid, doc_lens)).float()

    def decode(self, idx, cache: DecodeCache):
        """One decoding step: idx (B*n, 1) holds each sample's newest token. Writes its keys and values, moves the
        cache on, and returns the next logits (B*n, vocab), fp32. The step itself is `decode_step` (compiled by
        compile_hot_paths); this wrapper keeps the Python counters outside it."""
        logits = self.decode_step(idx, cache, cache.span())
        cache.advance()
        return logits

    def decode_step(self, idx, cache: DecodeCache, span: int):
        x = self.model.embed_tokens(idx)
        cos, sin = self.rotary(cache.pos, x.dtype)
        keep = cache.keep(span)
        for layer in self.model.layers:
            x = layer(x, cos, sin, keep, cache)
        return self.lm_head(self.model.norm(x)[:, -1]).float()

    def packed_logits(self, idx, doc_lens, at):
        """Training on one packed row (see hidden's doc_lens): logits (N, vocab), fp32, at the positions `at`
        only, the ones with a target (the (T, vocab) tensor is never built). Compiled by compile_hot_paths."""
        return self.lm_head(self.hidden(idx, doc_lens=doc_lens)[0, at]).float()

    def compile_hot_paths(self):
        """torch.compile the two calls SEAL makes thousands of times: the decoding step (static shapes: the cache
        is preallocated and its attended length bucketed, see DecodeCache) and the packed training forward
        (dynamic=True: every batch packs to another length). The first calls of each shape pay the compile
        time; a changed module tree (an adapter injected or removed) recompiles. Everything else stays eager.
        On a GPU the decoding step also replays as a CUDA graph: a 1B model's step is a few hundred small kernels,
        bound by their launches. generate's caches live in buffers the model keeps (Buffers): a graph recorded in
        one call replays in the next call of the same shapes, and the span and prompt-length buckets bound the
        shapes (a new bucket, batch or sample count records once more)."""
        # each span bucket, adapter on or off, and number of packed documents is its own graph: allow more than 8
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        graphs = self.lm_head.weight.is_cuda
        self.decode_step = torch.compile(self.decode_step, mode="reduce-overhead" if graphs else None)
        self.packed_logits = torch.compile(self.packed_logits, dynamic=True)
        return self

    # Keep generate's caches in Buffers across calls (DecodeCache): None is on CUDA (CUDA graphs need it), off
    # elsewhere (on a CPU it would only hold the largest cache's memory). A model's own attribute overrides it.
    keep_buffers = None
    PREFIX_BUCKET = 64  # with kept buffers, a prompt cache's length rounds up to this: a few shapes, not one per length

    def cache_buffers(self):
        """The model's Buffers when kept (keep_buffers), else None."""
        keep = self.lm_head.weight.is_cuda if self.keep_buffers is None else self.keep_buffers
        if not keep:
            return None
        if getattr(self, "_kept", None) is None:
            self._kept = Buffers()  # a plain attribute, not a module buffer: state_dict and .to() never see it
        return self._kept

    def new_cache(self, batch: int, max_len: int, reuse: bool = False) -> KVCache:
        """A prefill cache; reuse=True (generate's, read by a DecodeCache) takes it from the kept buffers if any."""
        p, buffers = self.lm_head.weight, self.cache_buffers() if reuse else None
        if buffers is not None:
            max_len = -(-max_len // self.PREFIX_BUCKET) * self.PREFIX_BUCKET
        return KVCache(self.config, batch, max_len, device=p.device, dtype=p.dtype, buffers=buffers)

    def decode_cache(self, prefix: KVCache, n: int, max_new: int, next_pos: torch.Tensor) -> DecodeCache:
        return DecodeCache(prefix, n, max_new, next_pos, buffers=self.cache_buffers())
