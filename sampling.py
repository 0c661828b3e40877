"""
Sampling from a model: left-padded batches, one prefill whose cache n samples share (model.DecodeCache), tokens
kept on the device until the end; and fill-in sampling of structured answers (sample_template). What SEAL samples
self-edits with and what the adapted models answer with.

    python sampling.py --prompt="The capital of France is"          # first thing to try
    python sampling.py --model=meta-llama/Llama-3.2-1B-Instruct --chat=true --prompt="Hi!"
"""
import sys
import time
from dataclasses import dataclass

import torch

import checkpoint
import model as model_lib
from settings import device_and_dtype, parse_overrides

# -----------------------------------------------------------------------------
# Generation: left-padded batches, one prefill shared by n samples (model.DecodeCache)


def sample_next(logits, temperature, top_p, u):
    """logits (B, V) fp32 -> (B,) token ids. temperature 0 is greedy; else u (B,) holds one uniform per row."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    order = None
    if top_p < 1.0:  # nucleus: keep the smallest prefix of sorted tokens whose mass reaches top_p
        probs, order = probs.sort(dim=-1, descending=True)
        probs = probs.masked_fill(probs.cumsum(-1) - probs > top_p, 0)
    # Inverse-CDF draw: one uniform per row, drawn ahead from the row's own generator (see generate_ids).
    # torch.multinomial draws an exponential per vocabulary entry, which on a CPU was ~7% of a decoding step.
    cdf = probs.cumsum(-1)
    picked = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True).clamp_(max=cdf.shape[-1] - 1)
    return (picked if order is None else order.gather(-1, picked))[:, 0]


def stop_after_ids(tok, stop, vocab_size) -> list:
    """Token ids whose text contains one of the stop strings: decoding stops after them (they stay in the ids;
    `generate` cuts the text). Found once per tokenizer and stop set. A stop string split over two tokens is not
    caught here (the row runs on), but `generate` still cuts the text at it, so the text is the same."""
    found = tok.__dict__.setdefault("_stop_after_ids", {})
    if tuple(stop) not in found:
        found[tuple(stop)] = [i for i in range(vocab_size) if any(s in tok.decode([i]) for s in stop)]
    return found[tuple(stop)]


@torch.no_grad()
def generate_ids(m, tok, prompts, max_new_tokens=128, temperature=0.0, top_p=1.0, n=1, stop=(), seed=0,
                 compact=None):
    """prompts: token-id lists. Returns len(prompts) * n completions (token-id lists, samples of a prompt
    adjacent). A completion ends before its stop token, or after a token that contains a stop string.
    seed: one per prompt (a list), or an int s for seeds s, s+1, ... Prompt j's n samples draw their uniforms from
    a generator seeded with seed j alone, so what a prompt samples does not depend on the other prompts of its
    batch, or on how prompts are batched (up to float rounding that changes with the batch's shape).
    The tokens stay on the device until the end: on a GPU the host looks at them once every 16 steps (to end
    early when every row is done), not once per token.
    compact (default: on a CPU): drop finished samples from the batch once that makes it at least a quarter
    smaller (`compact_rows`). Short answers end at different steps (sampled knowledge answers: 40% of the rows
    still run, on average, docs/speed.md), and on a CPU a step's cost grows with its rows. Off on a GPU: new shapes
    would recompile a compiled step, and a small batch's step there costs about the same whatever its rows."""
    dev = m.lm_head.weight.device
    B, L = len(prompts), max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0:
        raise ValueError("empty prompt: give at least one token (e.g. BOS)")
    seeds = [seed + j for j in range(B)] if isinstance(seed, int) else list(seed)
    if len(seeds) != B:
        raise ValueError(f"{len(seeds)} seeds for {B} prompts")
    x = torch.full((B, L), tok.pad_id, dtype=torch.long)
    valid = torch.zeros(B, L, dtype=torch.bool)
    for i, p in enumerate(prompts):  # left padding: every row's last prompt token sits at column L-1
        x[i, L - len(p):] = torch.tensor(p)
        valid[i, L - len(p):] = True
    x, valid = x.to(dev), valid.to(dev)
    pos = (valid.long().cumsum(1) - 1).clamp(min=0)
    prompt_cache = m.new_cache(B, L, reuse=True)  # on a GPU, from buffers kept across calls (model.Buffers)
    h = m.hidden(x, input_pos=pos, cache=prompt_cache, valid=valid)[:, -1]
    logits = m.lm_head(h).float().repeat_interleave(n, 0)  # one prefill; the n samples share its cache
    cache = m.decode_cache(prompt_cache, n, max_new_tokens - 1, pos[:, -1:].repeat_interleave(n, 0) + 1)
    uniforms = None
    if temperature > 0:  # every row's uniforms for every step, drawn ahead on the host: one transfer
        uniforms = torch.cat([torch.rand(n, max_new_tokens, generator=torch.Generator().manual_seed(s))
                              for s in seeds]).to(dev)
    stop_now = torch.tensor(sorted(tok.stop_ids), dtype=torch.long, device=dev)
    stop_after = torch.tensor(stop_after_ids(tok, stop, logits.shape[-1]) if stop else [], dtype=torch.long,
                              device=dev)
    out = torch.full((B * n, max_new_tokens), -1, dtype=torch.long, device=dev)  # -1: no token
    done = torch.zeros(B * n, dtype=torch.bool, device=dev)
    check = 1 if dev.type == "cpu" else 16  # a host sync costs nothing on a CPU
    compact = dev.type == "cpu" if compact is None else compact
    rows, real = None, None  # after a compaction: each decoded row's output row, and False at padding rows
    prompts_now = torch.arange(B, device=dev)  # the prompts in the cache, as indices into `prompts`
    steps = 0
    for t in range(max_new_tokens):
        u = None if uniforms is None else uniforms[:, t] if rows is None else uniforms[rows, t]
        nxt = sample_next(logits, temperature, top_p, u)
        at, new = (slice(None), nxt) if rows is None else (rows[real], nxt[real])
        ends = torch.isin(new, stop_now)
        out[at, t] = torch.where(done[at] | ends, -1, new)
        done[at] |= ends | torch.isin(new, stop_after)
        steps = t + 1
        if steps == max_new_tokens or steps % check == 0 and bool(done.all()):
            break
        if compact:
            picked = compact_rows(done, B, n, rows, real, len(nxt))
            if picked is not None:
                sel, keep_prompts, width, rows, real = picked
                cache.select(sel, torch.searchsorted(prompts_now, keep_prompts), width)
                prompts_now = keep_prompts
                logits, nxt = logits[sel], nxt[sel]
        logits = m.decode(nxt[:, None], cache)
    return [[t for t in row if t >= 0] for row in out[:, :steps].tolist()]  # the one transfer to the host


def compact_rows(done, B, n, rows, real, width_now, shrink=0.75):
    """Which rows to keep decoding, or None if dropping the finished ones would not make the batch at least a
    quarter smaller (each compaction copies the samples' caches). done: (B*n,) per output row; rows, real: the
    current rows' output rows and padding mask (None: all B*n rows, in order). The prompts with a sample left keep
    a group of n' rows each, n' their largest number of live samples, so the prompt cache is still read once per
    prompt (DecodeCache); a smaller group is padded with copies of one of its live rows, whose tokens are never
    written. Returns (rows to keep, as indices into the current rows; the prompts kept; n'; their output rows;
    the padding mask), the prompts as indices into all B."""
    live = ~done.view(B, n)
    counts = live.sum(1)
    width = int(counts.max())
    keep_prompts = counts.nonzero()[:, 0]
    if width == 0 or len(keep_prompts) * width > shrink * width_now:
        return None
    out_rows, pad = [], []
    for p in keep_prompts.tolist():
        ids = (live[p].nonzero()[:, 0] + p * n).tolist()
        out_rows += ids + [ids[0]] * (width - len(ids))
        pad += [False] * len(ids) + [True] * (width - len(ids))
    out_rows = torch.tensor(out_rows, device=done.device)
    where = torch.arange(B * n, device=done.device) if rows is None else \
        torch.full((B * n,), -1, dtype=torch.long, device=done.device).index_put_(
            (rows[real],), real.nonzero()[:, 0])  # output row -> its (unpadded) current row
    return where[out_rows], keep_prompts, width, out_rows, ~torch.tensor(pad, device=done.device)


@torch.no_grad()
def sample_template(m, tok, prompt, template, n=1, temperature=1.0, seed=0, trace=None):
    """Fill-in sampling for structured answers a small model cannot write freely. template: a list of
    (fixed_text, options): the fixed text is forced, then one option is sampled from the model's own
    probability of each option's tokens, renormalised over the options (at `temperature`; 0 takes the most
    likely). The policy is still the model's, restricted to valid answers, so ReST-EM can sharpen it.
    Returns n token-id lists (the answer after the prompt). trace: a list that receives, per sample and
    field, the options' log-probabilities before renormalising (to inspect the policy)."""
    dev = m.lm_head.weight.device
    enc = lambda s: tok.encode(s) if s else []
    room = len(prompt) + sum(len(enc(f)) + max((len(enc(o)) for o in opts or [""]), default=0)
                             for f, opts in template) + 1
    cache = m.new_cache(1, room)
    h = m.hidden(torch.tensor([prompt], device=dev), cache=cache)[:, -1]
    gen = torch.Generator(device=dev).manual_seed(seed)
    outs = []
    for _ in range(n):
        c, last, ids = cache.repeat(1), h, []
        for fixed, options in template:
            f_ids = enc(fixed)
            if f_ids:
                last = m.hidden(torch.tensor([f_ids], device=dev), cache=c)[:, -1]
                ids += f_ids
            if not options:
                continue
            o_ids = [enc(o) for o in options]
            L = max(map(len, o_ids))
            rows = torch.tensor([o + [tok.pad_id] * (L - len(o)) for o in o_ids], device=dev)
            first = torch.log_softmax(m.lm_head(last).float(), -1)[0]  # the option's first token
            logp = first[rows[:, 0]]
            if L > 1:  # the rest of each option, all options side by side in one batch
                rest = torch.log_softmax(m(rows[:, :-1], cache=c.repeat(len(options))), -1)
                tok_lp = rest.gather(-1, rows[:, 1:, None])[..., 0]
                mask = torch.tensor([[t < len(o) for t in range(1, L)] for o in o_ids], device=dev)
                logp = logp + (tok_lp * mask).sum(-1)
            if trace is not None:
                trace.append(logp.tolist())
            if temperature <= 0:
                j = int(logp.argmax())
            else:
                j = int(torch.multinomial(torch.softmax(logp / temperature, -1), 1, generator=gen))
            last = m.hidden(torch.tensor([o_ids[j]], device=dev), cache=c)[:, -1]
            ids += o_ids[j]
        outs.append(ids)
    return outs


def cut_at_stop(text, stop):
    for s in stop:
        if s in text:
            text = text[:text.index(s)]
    return text


def generate(m, tok, prompts, max_new_tokens=128, temperature=0.0, top_p=1.0, n=1, stop=(), seed=0,
             batch_size=64):
    """Text in, text out. prompts: strings (encoded as they are, no BOS added) or token-id lists."""
    ids = [tok.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    texts = []
    for i in range(0, len(ids), batch_size):
        outs = generate_ids(m, tok, ids[i:i + batch_size], max_new_tokens, temperature, top_p, n, stop, seed + i)
        texts += [cut_at_stop(tok.decode(o), stop) for o in outs]
    return texts



# -----------------------------------------------------------------------------
# CLI: `python sampling.py --prompt=...`, the first thing to try with any model.


@dataclass
class GenerateConfig:
    model: str = checkpoint.OFFLINE_DEFAULT  # a hub id, a local folder, or smollm2-135m (the offline model)
    prompt: str = "The capital of France is"
    max_new_tokens: int = 32
    temperature: float = 0.0        # 0: greedy
    chat: bool = False              # wrap the prompt in the model's chat template (instruct models)
    device: str = "auto"            # cuda if available, else cpu
    dtype: str = "auto"             # bf16 on cuda, fp32 on cpu


def cli_generate(argv):
    opts = parse_overrides(GenerateConfig(), argv)
    device, dtype = device_and_dtype(opts)
    m, tok = checkpoint.load(opts.model, device=device, dtype=dtype)
    prompt = tok.chat([{"role": "user", "content": opts.prompt}]) if opts.chat else opts.prompt
    t0 = time.time()
    ids = generate_ids(m, tok, [tok.encode(prompt)], opts.max_new_tokens, opts.temperature)[0]
    dt = time.time() - t0
    print(opts.prompt + tok.decode(ids))
    print(f"--- {len(ids)} tokens in {dt:.2f}s ({len(ids) / dt:.1f} tok/s, prefill included)", file=sys.stderr)


if __name__ == "__main__":
    cli_generate(sys.argv[1:])
