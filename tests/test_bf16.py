"""bf16 base weights on a CPU (fp32 adapter masters and optimizer state, as on a GPU): the oneDNN-prepacked decoding
path, the packed training row's fp32 attention and the adapter branch computed in bf16 follow the fp32 model within
bf16's rounding."""
import copy

import pytest
import torch

import lora
import model
from conftest import LLAMA, random_model


@pytest.mark.skipif(torch.bfloat16 not in model.PACKED_DTYPES, reason="this CPU has no oneDNN bf16")
def test_prepacked_bf16_rows_equal_the_plain_product():
    torch.manual_seed(0)
    lin = model.Linear(64, 96).to(torch.bfloat16)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    plain = torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float())
    with torch.no_grad():
        out = lin(x)
    assert lin._packed is not None and out.dtype == torch.bfloat16  # 5 rows without grad: the packed path
    assert torch.allclose(out.float(), plain, rtol=2e-2, atol=2e-2)


def test_bf16_training_step_follows_fp32():
    """The same LoRA step on a packed row of three documents: loss and adapter gradients of the bf16 model (its
    attention upcast to fp32 on a CPU) against the fp32 model's."""
    m32 = random_model(LLAMA, std=0.05)
    m16 = copy.deepcopy(m32).to(torch.bfloat16)  # the rotary frequencies, a plain attribute, stay fp32
    g = torch.Generator().manual_seed(0)
    docs = [(torch.randint(3, 97, (n,), generator=g).tolist(), torch.randint(3, 97, (8,), generator=g).tolist())
            for n in (12, 30, 5)]
    out = {}
    for name, m in (("fp32", m32), ("bf16", m16)):
        adapter = lora.inject(m, 8, 16, ("q_proj", "v_proj", "down_proj"), seed=0)
        for mod in adapter.modules.values():  # a nonzero B, so the adapter's own output matters
            torch.nn.init.normal_(mod.lora_B, std=0.1, generator=torch.Generator().manual_seed(1))
        m.train()
        loss = lora.packed_loss(m, lora.pack(docs))
        loss.backward()
        out[name] = loss.item(), torch.cat([p.grad.flatten() for p in adapter.params()])
        assert all(p.dtype == torch.float32 for p in adapter.params())
    (l32, g32), (l16, g16) = out["fp32"], out["bf16"]
    assert l16 == pytest.approx(l32, rel=1e-2)
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.99
    assert g16.norm() == pytest.approx(g32.norm().item(), rel=5e-2)


class MatmulDtypes(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the dtypes of every matrix product run under it (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.seen.append({a.dtype for a in args if isinstance(a, torch.Tensor)})
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_lora_branch_computes_in_the_weights_dtype_from_fp32_masters(dtype):
    """On bf16 runs the adapter's products run in bf16 (mixed precision: issue 26 item 7), forward and backward, and
    the gradients land on the fp32 masters; on fp32 runs everything stays fp32."""
    torch.manual_seed(0)
    lin = lora.LoRALinear(model.Linear(64, 96).to(dtype), r=8, alpha=16)
    torch.nn.init.normal_(lin.lora_A, std=0.1)
    torch.nn.init.normal_(lin.lora_B, std=0.1)
    x = torch.randn(2, 5, 64, dtype=dtype)
    with MatmulDtypes() as rec:
        y = lin(x)
        y.float().square().sum().backward()
    assert y.dtype == dtype
    assert len(rec.seen) >= 5 and all(s == {dtype} for s in rec.seen)  # A, B forward; their grads and x's path
    assert lin.lora_A.dtype == lin.lora_B.dtype == lin.lora_A.grad.dtype == lin.lora_B.grad.dtype == torch.float32
    # the same function as the fp32 branch, within bf16's rounding
    ref = lin.base(x).float() + lin.scale * x.float() @ lin.lora_A.t() @ lin.lora_B.t()
    assert torch.allclose(y.float(), ref, rtol=2e-2, atol=2e-2 if dtype == torch.bfloat16 else 1e-5)


def test_bf16_training_run_follows_fp32():
    """Ten LoRA steps on the same row (the knowledge preset's recipe: batch 1, loss on all tokens, AdamW, linear
    decay): the bf16 model's losses stay within 1% of the fp32 model's at every step while the loss falls by 40%
    (measured: within 0.1%)."""
    m32 = random_model(LLAMA, std=0.05)
    m16 = copy.deepcopy(m32).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    examples = [([], torch.randint(3, 97, (40,), generator=g).tolist())]
    losses = {}
    for name, m in (("fp32", m32), ("bf16", m16)):
        adapter = lora.inject(m, 8, 16, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
        losses[name] = lora.train(m, examples, lr=1e-2, epochs=10, batch_size=1, loss_on="all", schedule="linear",
                                  adapter=adapter).losses
    assert losses["fp32"][-1] < 0.7 * losses["fp32"][0]  # it learns
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=1e-2)
