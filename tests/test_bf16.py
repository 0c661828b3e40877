"""bf16 base weights on a CPU (fp32 adapters and optimizer state, as on a GPU): the oneDNN-prepacked decoding path
and the packed training row's fp32 attention follow the fp32 model within bf16's rounding."""
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
