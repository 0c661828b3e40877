import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import checkpoint
import lora
import model
from conftest import LLAMA, QWEN2, random_model

ALL5 = ("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj")  # the ARC inner loop's targets


def rand_examples(n, seed=0, prompt=(3, 20), completion=(2, 12), vocab=97):
    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
    return [(torch.randint(0, vocab, (r(*prompt),), generator=g).tolist(),
             torch.randint(0, vocab, (r(*completion),), generator=g).tolist()) for _ in range(n)]


def randomize_B(adapter, seed=1, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in adapter.modules.values():
            mod.lora_B.copy_(torch.randn(mod.lora_B.shape, generator=g) * std)


def hf_model(folder):
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


# ----------------------------------------------------------------------------- optimizer, clip, schedules

@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_adamw_matches_torch(wd):
    """The written-out update is torch.optim.AdamW's: bit for bit its foreach form (the same ops in the same order),
    within 1e-6 its per-tensor loop."""
    torch.manual_seed(0)
    shapes = [(8, 16), (16,), (3, 5, 7)]
    ours = [nn.Parameter(torch.randn(s)) for s in shapes]
    refs = {foreach: [nn.Parameter(p.detach().clone()) for p in ours] for foreach in (True, False)}
    start = [p.detach().clone() for p in ours]
    opt = lora.AdamW(ours, lr=1e-2, weight_decay=wd)
    ref_opts = [torch.optim.AdamW(ref, lr=1e-2, weight_decay=wd, foreach=foreach) for foreach, ref in refs.items()]
    for step in range(20):
        lr = 1e-2 * (1 - step / 20)  # the lr changes every step, as under a schedule
        opt.lr = lr
        for ref_opt in ref_opts:
            for g in ref_opt.param_groups:
                g["lr"] = lr
        for i, a in enumerate(ours):
            a.grad = torch.randn(a.shape)
            for ref in refs.values():
                ref[i].grad = a.grad.clone()
        for o in (opt, *ref_opts):
            o.step()
            o.zero_grad()
    for a, b, c, s in zip(ours, refs[True], refs[False], start):
        assert torch.equal(a, b)
        assert (a - c).abs().max() < 1e-6
        assert (a - s).abs().max() > 1e-2  # the params did move
    assert opt.lr == lr and all(p.grad is None for p in ours)


@pytest.mark.parametrize("scale", [10.0, 1e-3], ids=["clipped", "unclipped"])
def test_clip_matches_torch(scale):
    torch.manual_seed(0)
    ours = [nn.Parameter(torch.zeros(s)) for s in [(10, 3), (7,)]]
    ref = [nn.Parameter(torch.zeros(s)) for s in [(10, 3), (7,)]]
    for a, b in zip(ours, ref):
        a.grad = torch.randn(a.shape) * scale
        b.grad = a.grad.clone()
    n = lora.clip_grad_norm(ours, 1.0)
    n_ref = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    assert torch.equal(n, n_ref)
    for a, b in zip(ours, ref):
        assert torch.equal(a.grad, b.grad)
    total = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in ours))
    assert (total < 1.0 + 1e-5) if scale > 1 else (abs(total - float(n)) < 1e-6)


@pytest.mark.parametrize("kind,warmup", [("cosine", 11), ("cosine", 0), ("linear", 5), ("linear", 0),
                                         ("constant", 3)])
def test_schedules_match_transformers(kind, warmup):
    transformers = pytest.importorskip("transformers")
    total, base = 37, 3e-4
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base)
    if kind == "constant":
        sched = transformers.get_constant_schedule_with_warmup(opt, warmup)
    else:
        make = {"cosine": transformers.get_cosine_schedule_with_warmup,
                "linear": transformers.get_linear_schedule_with_warmup}[kind]
        sched = make(opt, warmup, total)
    for step in range(total):
        assert abs(lora.lr_at(step, total, base, warmup, kind) - sched.get_last_lr()[0]) < 1e-12
        opt.step()
        sched.step()
    assert lora.lr_at(0, total, base, warmup, kind) == (0.0 if warmup else base)  # HF: warmup starts at lr 0
    assert lora.lr_at(warmup, total, base, warmup, kind) == base


# ----------------------------------------------------------------------------- the LoRA layer and adapter

@pytest.mark.parametrize("cfg", [LLAMA, QWEN2], ids=["llama", "qwen2-qkv-bias"])
def test_zero_B_gives_base_logits_exactly(cfg):
    m = random_model(cfg)
    idx = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        before = m(idx)
        adapter = lora.inject(m, r=8, alpha=16, targets=ALL5)
        assert torch.equal(m(idx), before)
        randomize_B(adapter)
        assert (m(idx) - before).abs().max() > 1e-2  # and the branch is live
    assert len(adapter.modules) == 2 * 5
    assert "model.layers.1.mlp.down_proj" in adapter.modules
    assert all(not p.requires_grad for n, p in m.named_parameters() if "lora_" not in n)
    assert all(p.requires_grad and p.dtype == torch.float32 for p in adapter.params())



def test_adamw_fused_matches_written_out():
    """fused=True (torch.optim.AdamW(fused=True), what lora.train steps with) is the written-out update, rounded
    differently in the last bits; the lr set between steps reaches it."""
    torch.manual_seed(0)
    written = [nn.Parameter(torch.randn(s)) for s in [(8, 16), (16,), (3, 5, 7)]]
    fused = [nn.Parameter(p.detach().clone()) for p in written]
    start = [p.detach().clone() for p in written]
    opts = [lora.AdamW(written, lr=1e-2, weight_decay=0.01), lora.AdamW(fused, lr=1e-2, weight_decay=0.01, fused=True)]
    for step in range(20):
        for a, b in zip(written, fused):
            a.grad = torch.randn(a.shape)
            b.grad = a.grad.clone()
        for o in opts:
            o.lr = 1e-2 * (1 - step / 20)
            o.step()
            o.zero_grad()
    for a, b, s in zip(written, fused, start):
        assert (a - b).abs().max() < 1e-6 and (a - s).abs().max() > 1e-2  # equal, and they did move
    assert opts[1].t == 20 and opts[1].fused.param_groups[0]["lr"] == opts[0].lr

def test_lora_A_init_is_peft_kaiming_uniform():
    m = random_model(LLAMA)
    adapter = lora.inject(m, r=64, alpha=16, targets=("gate_proj",))
    A = adapter.modules["model.layers.0.mlp.gate_proj"].lora_A.detach()
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) on fan_in=64
    assert A.abs().max() <= bound and A.abs().max() > 0.95 * bound and abs(float(A.mean())) < 0.01
    first_A = lambda seed: lora.inject(random_model(LLAMA), r=64, alpha=16, targets=("gate_proj",), seed=seed) \
        .modules["model.layers.0.mlp.gate_proj"].lora_A.detach()
    assert torch.equal(first_A(0), A) and not torch.equal(first_A(1), A)  # the seed decides A
    adapter.reset(seed=1)
    assert torch.equal(adapter.modules["model.layers.0.mlp.gate_proj"].lora_A, first_A(1))


@pytest.mark.parametrize("cfg", [LLAMA, QWEN2], ids=["llama", "qwen2-qkv-bias"])
def test_merge_equals_unmerged_and_unwraps(cfg):
    m = random_model(cfg)
    adapter = lora.inject(m, r=8, alpha=16, targets=ALL5)
    randomize_B(adapter)
    idx = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        unmerged = m(idx)
        adapter.merge()
        merged = m(idx)
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)  # fp32 rounding of a reordered sum only
    assert not any(isinstance(mod, lora.LoRALinear) for mod in m.modules())
    assert set(m.state_dict()) == set(random_model(cfg).state_dict())
    with pytest.raises(RuntimeError):
        adapter.params()


def test_bf16_base_fp32_adapter():
    torch.manual_seed(0)
    base = nn.Linear(32, 48, bias=False).to(torch.bfloat16).requires_grad_(False)
    layer = lora.LoRALinear(base, r=4, alpha=8)
    with torch.no_grad():
        nn.init.normal_(layer.lora_A)
        nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.dtype == torch.float32
    with torch.no_grad():
        expect = x.float() @ base.weight.float().T + 2.0 * (x.float() @ layer.lora_A.T @ layer.lora_B.T)
    assert (y.float() - expect).abs().max() < 0.01 * expect.abs().max()  # bf16 rounding of the sum only
    layer.merge()
    assert base.weight.dtype == torch.bfloat16 and layer(x).dtype == torch.bfloat16


def test_inject_twice_is_refused_until_removed():
    m = random_model(LLAMA)
    adapter = lora.inject(m, r=4, alpha=8)
    with pytest.raises(RuntimeError, match="already has LoRA"):
        lora.inject(m, r=16, alpha=16)
    adapter.remove()
    assert isinstance(m.model.layers[0].self_attn.q_proj, nn.Linear)
    lora.inject(m, r=16, alpha=16)
    with pytest.raises(ValueError, match="no nn.Linear"):
        lora.inject(random_model(LLAMA), r=4, alpha=8, targets=("nope",))


# ----------------------------------------------------------------------------- packing and the loss

def test_pack_targets():
    ex = [([1, 2, 3], [4, 5]), ([6], [7, 8])]
    p = lora.pack(ex, "completion")
    assert p.idx.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]] and p.doc_ids.tolist() == [[0] * 5 + [1] * 3]
    assert p.pos.tolist() == [2, 3, 5, 6] and p.targets.tolist() == [4, 5, 7, 8]
    p = lora.pack(ex, "all")
    assert p.pos.tolist() == [0, 1, 2, 3, 5, 6] and p.targets.tolist() == [2, 3, 4, 5, 7, 8]  # never 5 -> 6


def test_packed_loss_equals_per_example_loss_and_hf_labels(tmp_path):
    m = random_model(LLAMA)
    exs = rand_examples(3, seed=4)
    with torch.no_grad():
        packed = lora.packed_loss(m, lora.pack(exs))
        alone = [lora.packed_loss(m, lora.pack([e])) for e in exs]
        n = [len(c) for _, c in exs]
        assert abs(float(packed) - sum(a * k for a, k in zip(alone, n)) / sum(n)) < 1e-5
        # each example's loss is what HF computes with labels = -100 on the prompt (the official masking)
        checkpoint.save(m, tmp_path)
        hf = hf_model(tmp_path)
        for (p, c), a in zip(exs, alone):
            ids = torch.tensor([p + c])
            labels = ids.clone()
            labels[0, :len(p)] = -100
            assert abs(float(hf(ids, labels=labels).loss) - float(a)) < 1e-5


def test_no_gradient_across_documents():
    m = random_model(LLAMA)
    lora.inject(m, r=4, alpha=8, targets=ALL5)
    p = lora.pack(rand_examples(2, seed=5))
    captured = {}

    def hook(_mod, _inp, out):
        captured["emb"] = out = out.detach().requires_grad_()
        return out

    handle = m.model.embed_tokens.register_forward_hook(hook)
    second = p.doc_ids[0, p.pos] == 1
    p2 = lora.Packed(p.idx, p.doc_ids, p.doc_lens, p.pos[second], p.targets[second])  # document 2's loss only
    lora.packed_loss(m, p2).backward()
    handle.remove()
    g = captured["emb"].grad[0].abs().sum(-1)
    in_doc1 = p.doc_ids[0] == 0
    assert g[in_doc1].max() == 0
    assert (g[~in_doc1][:-1] > 0).all()  # every earlier token of document 2 does get gradient


# ----------------------------------------------------------------------------- the training loop

def test_training_moves_only_adapter_and_reset_restores():
    m = random_model(LLAMA)
    adapter = lora.inject(m, r=8, alpha=16, targets=ALL5)
    base_before = {k: v.clone() for k, v in m.state_dict().items() if "lora_" not in k}
    init = adapter.state_dict()
    res = lora.train(m, rand_examples(6), lr=1e-2, epochs=2, adapter=adapter, warmup=1)
    assert res.steps == 6 and res.failed is None and len(res.losses) == 6 and res.target_tokens > 0
    after = m.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base_before.items())
    trained = adapter.state_dict()
    assert all(not torch.equal(trained[k], v) for k, v in init.items())  # every A and B moved
    adapter.reset()
    assert all(torch.equal(adapter.state_dict()[k], v) for k, v in init.items())
    adapter.reset(seed=7)
    fresh = adapter.state_dict()
    assert all(not torch.equal(fresh[k], v) for k, v in init.items() if "lora_A" in k)
    assert all(v.abs().max() == 0 for k, v in fresh.items() if "lora_B" in k)
    adapter.load_state_dict(trained)
    assert all(torch.equal(adapter.state_dict()[k], v) for k, v in trained.items())


def test_batches_shuffle_each_epoch_deterministically():
    plan = lora.batches(10, 3, 2, seed=0)
    assert [len(b) for b in plan] == [3, 3, 3, 1] * 2  # the last batch of an epoch is short, as in HF
    e1, e2 = sum(plan[:4], []), sum(plan[4:], [])
    assert sorted(e1) == sorted(e2) == list(range(10)) and e1 != e2 and e1 != list(range(10))
    assert lora.batches(10, 3, 2, seed=0) == plan and lora.batches(10, 3, 2, seed=1) != plan


def test_training_is_deterministic():
    runs = []
    for _ in range(2):
        m = random_model(LLAMA)
        adapter = lora.inject(m, r=8, alpha=16, targets=ALL5)
        runs.append(lora.train(m, rand_examples(5), lr=1e-2, epochs=2, loss_on="all", seed=3).losses)
    assert runs[0] == runs[1] and len(runs[0]) == 6


def test_learns_a_short_string():
    m = random_model(LLAMA)  # (with std 0.02 the frozen lm_head cannot make peaked logits after the final norm)
    adapter = lora.inject(m, r=8, alpha=16, targets=ALL5)
    ex = [([5, 6, 7], [11, 22, 33, 44, 55, 66, 77, 88])] * 4
    res = lora.train(m, ex, lr=1e-2, epochs=20, batch_size=2, adapter=adapter)
    assert res.steps == 40 and res.losses[0] > 3.0  # a random model: ln(97) = 4.6 or worse
    assert res.losses[-1] < 0.05, res.losses[::5]
    with torch.no_grad():
        logits = m(torch.tensor([ex[0][0] + ex[0][1]]))[0]
    assert logits[2:-1].argmax(-1).tolist() == ex[0][1]  # greedy decoding reproduces it


def test_nan_stops_restores_and_reports():
    m = random_model(LLAMA)
    adapter = lora.inject(m, r=8, alpha=16, targets=ALL5)
    init = adapter.state_dict()

    def poison(step, loss, lr):  # three good steps, then a weight goes to inf
        if step == 2:
            with torch.no_grad():
                m.model.layers[0].mlp.down_proj.base.weight[0, 0] = math.inf

    res = lora.train(m, rand_examples(10), lr=1e-2, epochs=1, adapter=adapter, on_step=poison)
    assert res.failed is not None and "step 3" in res.failed
    assert res.steps == 3 and all(math.isfinite(x) for x in res.losses)
    assert all(torch.equal(adapter.state_dict()[k], v) for k, v in init.items())
    assert all(p.grad is None for p in adapter.params())


def test_blowup_in_the_last_update_is_caught():
    m = random_model(LLAMA)
    adapter = lora.inject(m, r=8, alpha=16, targets=ALL5)
    init = adapter.state_dict()

    def blow_up(step, loss, lr):  # as if the last update overflowed: no later loss would show it
        if step == 1:
            with torch.no_grad():
                adapter.params()[3][0, 0] = math.inf

    res = lora.train(m, rand_examples(4), lr=1e-2, adapter=adapter, on_step=blow_up)
    assert res.failed is not None and "after step 1" in res.failed and res.steps == 2
    assert all(torch.equal(adapter.state_dict()[k], v) for k, v in init.items())


def test_bf16_base_model_trains_fp32_adapter():
    m = random_model(LLAMA).to(torch.bfloat16)
    adapter = lora.inject(m, r=8, alpha=16, targets=ALL5)
    base_before = {k: v.clone() for k, v in m.state_dict().items() if "lora_" not in k}
    res = lora.train(m, rand_examples(4), lr=1e-2, epochs=3, adapter=adapter)
    assert res.failed is None and res.losses[-1] < res.losses[0]
    assert all(p.dtype == torch.float32 for p in adapter.params())
    assert all(torch.equal(m.state_dict()[k], v) for k, v in base_before.items())
    assert m(torch.tensor([[1, 2, 3]])).dtype == torch.float32  # the model's logits are fp32 whatever the base


def test_too_long_dropped_and_empty_is_noop():
    m = random_model(LLAMA)
    adapter = lora.inject(m, r=4, alpha=8)
    init = adapter.state_dict()
    res = lora.train(m, [], lr=1e-2, adapter=adapter)
    assert (res.steps, res.tokens, res.dropped, res.failed, res.losses) == (0, 0, 0, None, [])
    ex = [([1] * 10, [2] * 10), ([1] * 3, [2] * 4), ([1] * 5, [])]  # too long; fine; nothing to predict
    res = lora.train(m, ex, lr=1e-2, max_len=16, adapter=adapter)
    assert res.dropped == 2 and res.steps == 1 and res.tokens == 7 and res.target_tokens == 4
    res = lora.train(m, ex[:1], lr=1e-2, max_len=16, adapter=adapter)
    assert res.dropped == 1 and res.steps == 0 and res.failed is None
    with pytest.raises(ValueError):
        lora.train(random_model(LLAMA).requires_grad_(False), ex, lr=1e-2)  # nothing trainable: a mistake, not a silent no-op
    assert any(not torch.equal(adapter.state_dict()[k], v) for k, v in init.items())


# ----------------------------------------------------------------------------- PEFT and transformers interop

def test_our_adapter_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    m = random_model(LLAMA)
    checkpoint.save(m, tmp_path / "base")
    adapter = lora.inject(m, r=8, alpha=16, targets=ALL5)
    lora.train(m, rand_examples(4), lr=1e-2, epochs=2, adapter=adapter)
    checkpoint.save_adapter(adapter, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    ref = peft.PeftModel.from_pretrained(hf_model(tmp_path / "base"), str(tmp_path / "adapter")).eval()
    idx = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        ours, theirs = m(idx), ref(idx).logits
        with ref.disable_adapter():
            base = ref(idx).logits
    assert (ours - theirs).abs().max() < 1e-4
    assert (theirs - base).abs().max() > 1e-2  # the adapter matters, so the match means something


def test_peft_adapter_loads_in_ours(tmp_path):
    peft = pytest.importorskip("peft")
    m = random_model(LLAMA)
    checkpoint.save(m, tmp_path / "base")
    ref = peft.get_peft_model(hf_model(tmp_path / "base"),
                              peft.LoraConfig(r=4, lora_alpha=12, target_modules=list(ALL5), task_type="CAUSAL_LM"))
    idx = torch.randint(0, 97, (2, 40))
    opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
    ref(idx, labels=idx).loss.backward()
    opt.step()
    ref.save_pretrained(str(tmp_path / "adapter"))
    adapter = checkpoint.load_adapter(m, tmp_path / "adapter")
    assert adapter.r == 4 and adapter.alpha == 12 and len(adapter.modules) == 10
    with torch.no_grad():
        ours, theirs = m(idx), ref.eval()(idx).logits
        with ref.disable_adapter():
            base = ref(idx).logits
    assert (ours - theirs).abs().max() < 1e-4
    assert (theirs - base).abs().max() > 1e-3


def test_merged_model_loads_in_transformers(tmp_path):
    m = random_model(LLAMA)
    adapter = lora.inject(m, r=8, alpha=16, targets=ALL5)
    randomize_B(adapter)
    idx = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        unmerged = m(idx)
    adapter.merge()
    checkpoint.save(m, tmp_path)
    with torch.no_grad():
        assert (hf_model(tmp_path)(idx).logits - unmerged).abs().max() < 1e-4


def test_lora_py_stays_readable():
    """One sitting's read (the project's target: 400 lines), and no private torch function: the update's math is on
    the page, and a fork on another torch version does not break here first. The _foreach ops are the exception."""
    src = (Path(__file__).resolve().parent.parent / "lora.py").read_text()
    assert len(src.splitlines()) <= 400
    assert not [f for f in re.findall(r"torch\._\w+", src) if not f.startswith("torch._foreach_")]


def test_bf16_factor_casts_are_kept_for_decoding_and_dropped_by_a_step():
    """Without grad, a bf16 layer casts its fp32 factors once and keeps the casts; an optimizer's step (any
    optimizer: torch's SGD here) and Adapter.reset drop them, so the next output uses the new factors."""
    torch.manual_seed(0)
    m = random_model(LLAMA).to(torch.bfloat16)
    adapter = lora.inject(m, r=4, alpha=8, targets=("q_proj",))
    randomize_B(adapter)
    layer = adapter.modules["model.layers.0.self_attn.q_proj"]
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    fresh = lambda: layer.base(x) + layer.scale * (x @ layer.lora_A.to(x.dtype).T) @ layer.lora_B.to(x.dtype).T
    with torch.no_grad():
        y0 = layer(x)
        A, B = layer.factors(torch.bfloat16)
        assert layer.factors(torch.bfloat16)[0] is A and layer(x).equal(y0)  # cast once, then kept
        torch.testing.assert_close(y0, fresh(), rtol=2e-2, atol=2e-2)
    opt = torch.optim.SGD(adapter.params(), lr=1.0)
    m(torch.tensor([[1, 2, 3]])).float().sum().backward()
    with torch.no_grad():  # a gradient is pending: no cast is kept until the step is done
        assert layer(x).equal(y0) and layer.cast is None
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        y1 = layer(x)
        assert layer.factors(torch.bfloat16)[0] is not A and not y1.equal(y0)
        torch.testing.assert_close(y1, fresh(), rtol=2e-2, atol=2e-2)
        adapter.reset()  # B = 0: the base layer again
        assert layer(x).equal(layer.base(x))
    import copy
    twin = copy.deepcopy(layer)  # a copy's factors are new tensors: their gradients drop the copy's casts too
    with torch.no_grad():
        twin(x)
    assert twin.cast is not None
    twin(x).float().sum().backward()
    assert twin.cast is None
