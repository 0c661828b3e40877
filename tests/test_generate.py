import pytest
import torch

import checkpoint
import sampling
from conftest import LLAMA, random_model


class StubTok:
    """Token i decodes to chr(65 + i); token 96 is the end-of-turn token."""
    pad_id, stop_ids = 0, {96}

    def encode(self, s):
        return [ord(c) - 65 for c in s]

    def decode(self, ids):
        return "".join(chr(65 + i) for i in ids)


def naive_greedy(m, prompt, n_new):
    """No cache: run the whole sequence again for every token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n_new):
            nxt = m(torch.tensor([ids]))[0, -1].argmax().item()
            if nxt in StubTok.stop_ids:
                break
            ids.append(nxt)
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def m():
    return random_model(LLAMA, seed=3, std=0.1)


def test_cached_greedy_equals_naive(m):
    prompt = [5, 17, 3, 60, 2, 9]
    assert sampling.generate_ids(m, StubTok(), [prompt], max_new_tokens=20)[0] == naive_greedy(m, prompt, 20)


def test_batched_prompts_of_different_lengths_equal_one_by_one(m):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 90, (n,), generator=g).tolist() for n in (3, 11, 7, 1)]
    batched = sampling.generate_ids(m, StubTok(), prompts, max_new_tokens=15)
    alone = [sampling.generate_ids(m, StubTok(), [p], max_new_tokens=15)[0] for p in prompts]
    assert batched == alone
    assert len(set(map(tuple, batched))) > 1  # not a degenerate model that says the same thing to everyone


def test_sampling_is_seeded_and_shares_the_prefill(m):
    tok = StubTok()
    a = sampling.generate_ids(m, tok, [[1, 2, 3], [4, 5]], 12, temperature=1.0, n=3, seed=7)
    b = sampling.generate_ids(m, tok, [[1, 2, 3], [4, 5]], 12, temperature=1.0, n=3, seed=7)
    c = sampling.generate_ids(m, tok, [[1, 2, 3], [4, 5]], 12, temperature=1.0, n=3, seed=8)
    assert len(a) == 6 and a == b and a != c
    assert len(set(map(tuple, a[:3]))) > 1  # three different samples of one prompt


def test_a_prompts_samples_do_not_depend_on_its_batch(m):
    tok = StubTok()
    long, short = [1, 2, 3, 4, 5, 6, 7], [4, 5]
    together = sampling.generate_ids(m, tok, [long, short], 12, temperature=1.0, n=3, seed=[11, 12])
    alone = sampling.generate_ids(m, tok, [short], 12, temperature=1.0, n=3, seed=[12])
    assert together[3:] == alone  # short was left-padded beside long, and had other neighbours
    assert together[:3] != together[3:]
    with pytest.raises(ValueError, match="2 seeds for 1 prompts"):
        sampling.generate_ids(m, tok, [short], 4, temperature=1.0, seed=[1, 2])


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {sampling.sample_next(logits, 1.0, 0.7, torch.rand(1, generator=g)).item() for _ in range(300)}
    assert draws == {0, 1}


def test_sampling_follows_the_distribution():
    """The inverse-CDF draw picks token i with probability p_i, also through the nucleus' sorted order."""
    probs = torch.tensor([0.1, 0.5, 0.0, 0.25, 0.15])
    logits = torch.log(probs)[None].expand(4000, 5)  # 4000 rows: 4000 independent draws in one call
    g = torch.Generator().manual_seed(0)
    u = lambda: torch.rand(4000, generator=g)
    freq = torch.bincount(sampling.sample_next(logits, 1.0, 1.0, u()), minlength=5) / 4000
    assert (freq - probs).abs().max() < 0.03 and freq[2] == 0
    nucleus = torch.bincount(sampling.sample_next(logits, 1.0, 0.7, u()), minlength=5) / 4000  # keeps 0.5, 0.25
    assert (nucleus - torch.tensor([0, 2 / 3, 0, 1 / 3, 0])).abs().max() < 0.03


def test_stop_strings_cut_the_text(m):
    tok = StubTok()
    full = sampling.generate(m, tok, ["FRDA"], max_new_tokens=12)[0]
    assert len(full) >= 4
    stop = full[2]
    cut = sampling.generate(m, tok, ["FRDA"], max_new_tokens=12, stop=(stop,))[0]
    assert cut == full[:full.index(stop)]
    ids = sampling.generate_ids(m, tok, [tok.encode("FRDA")], max_new_tokens=12, stop=(stop,))[0]
    assert tok.decode(ids) == full[:full.index(stop) + 1]  # decoding stopped right after the stop token
    two = full[2:4]  # a stop string over two tokens: decoding runs on, the text is still cut at it
    assert sampling.generate(m, tok, ["FRDA"], max_new_tokens=12, stop=(two,))[0] == full[:full.index(two)]


def test_real_model_greedy_matches_transformers(smollm2_dir):
    transformers = pytest.importorskip("transformers")
    m, tok = checkpoint.load(str(smollm2_dir))
    prompt = tok.chat([{"role": "user", "content": "What is the capital of France?"}])
    ids = tok.encode(prompt)
    ours = sampling.generate_ids(m, tok, [ids], max_new_tokens=24)[0]
    ref = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    out = ref.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=sorted(tok.stop_ids),
                       pad_token_id=tok.pad_id)[0, len(ids):].tolist()
    out = [t for t in out if t not in tok.stop_ids]
    assert ours == out
    assert "Paris" in tok.decode(ours)


@pytest.mark.parametrize("prompts", [[[5, 17, 3, 60], [2, 9, 11, 40]], [[5, 17, 3, 60], [2, 9, 11, 40, 8, 1, 30]]],
                         ids=["no-row-padded", "left-padded"])
def test_gpu_prefill_attention_gives_the_masked_results(m, prompts, monkeypatch):
    """On CUDA a prefill with no padded row attends with is_causal, and a masked one with K/V expanded to every
    query head (model.PREFILL_FAST_ON); run here on the CPU, both give what the masked GQA call gives."""
    import model
    assert m.config.n_kv_heads < m.config.n_heads  # grouped-query attention: the expanded K/V are really used

    def prefill_and_decode():
        cache = m.new_cache(len(prompts), 12)
        L = max(map(len, prompts))
        x = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
        valid = torch.tensor([[False] * (L - len(p)) + [True] * len(p) for p in prompts])
        with torch.no_grad():
            h = m.hidden(x, input_pos=(valid.long().cumsum(1) - 1).clamp(min=0), cache=cache, valid=valid)
            h2 = m.hidden(torch.tensor([[7], [8]]), cache=cache)  # a later call: masked, K/V expanded
        return h, h2, sampling.generate_ids(m, StubTok(), prompts, 12, n=2)

    want = prefill_and_decode()
    monkeypatch.setattr(model, "PREFILL_FAST_ON", ("cpu", "cuda"))
    got = prefill_and_decode()
    valid = [[False] * (max(map(len, prompts)) - len(p)) + [True] * len(p) for p in prompts]
    keep = torch.tensor(valid)
    torch.testing.assert_close(got[0][keep], want[0][keep], rtol=1e-5, atol=1e-5)  # pad rows' values are unused
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    assert got[2] == want[2]


def test_dropping_finished_samples_gives_the_same_tokens(m, monkeypatch):
    """On a CPU, generate_ids drops finished samples from the batch (compact_rows). With a fifth of the
    vocabulary ending a sample, rows end at different steps: the batch shrinks more than once, its prompts'
    groups shrink and are padded, and every sample's tokens equal those of the batch that never shrinks."""
    class ManyStops(StubTok):
        stop_ids = set(range(70, 90))

    shapes = []  # the (rows, prompts, group width) of each compaction; the real select runs underneath
    select = sampling.model_lib.DecodeCache.select
    monkeypatch.setattr(sampling.model_lib.DecodeCache, "select",
                        lambda self, rows, prompts, n: (shapes.append((len(rows), len(prompts), n)),
                                                        select(self, rows, prompts, n))[1])
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 60, (k,), generator=g).tolist() for k in (4, 9, 2, 6, 12)]
    for temperature in (1.0, 0.0):
        shapes.clear()
        whole = sampling.generate_ids(m, ManyStops(), prompts, 30, temperature, n=4, seed=3, compact=False)
        assert shapes == []
        shrunk = sampling.generate_ids(m, ManyStops(), prompts, 30, temperature, n=4, seed=3, compact=True)
        assert shrunk == whole
        if temperature > 0:
            assert len(shapes) >= 2 and shapes[-1][0] < 20
            assert any(p < 5 for _, p, _ in shapes) and any(w < 4 for _, _, w in shapes)
            assert len({len(s) for s in whole}) > 3  # the samples really ended at different steps


def test_two_generate_calls_reuse_one_decode_cache(m):
    """With kept buffers (the default on CUDA, where a compiled step's CUDA graph replays fixed addresses),
    generate's prompt and decoding caches are views of buffers the model keeps: a second call reuses the same
    tensors at the same addresses, decodes what a model that allocates per call decodes, and a shorter prompt
    after a longer one does not read the longer one's stale keys."""
    import copy
    kept = copy.deepcopy(m)
    kept.keep_buffers = True
    assert m.cache_buffers() is None  # a CPU model allocates per call by default
    first, second = [[5, 17, 3, 60, 2, 9, 11, 40], [4, 8]], [[1, 2, 3], [7, 7, 7, 7, 7]]
    a = sampling.generate_ids(kept, StubTok(), first, 10, temperature=1.0, n=3, seed=1, compact=False)
    bufs = dict(kept.cache_buffers().buffers)
    assert {"prefix_k", "prefix_v", "k0", "v1", "slot", "pos"} <= set(bufs)
    ptrs = {k: t.data_ptr() for k, t in bufs.items()}
    b = sampling.generate_ids(kept, StubTok(), second, 10, temperature=1.0, n=3, seed=2, compact=False)
    now = kept.cache_buffers().buffers
    assert now.keys() == bufs.keys() and all(now[k] is t for k, t in bufs.items())
    assert {k: t.data_ptr() for k, t in now.items()} == ptrs
    assert a == sampling.generate_ids(m, StubTok(), first, 10, temperature=1.0, n=3, seed=1, compact=False)
    assert b == sampling.generate_ids(m, StubTok(), second, 10, temperature=1.0, n=3, seed=2, compact=False)
    assert kept.cache_buffers().buffers["prefix_k"].shape[3] == kept.PREFIX_BUCKET  # 8 and 5 tokens: one bucket
