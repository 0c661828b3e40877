"""torch.compile of the two hot paths (model.compile_hot_paths) gives what eager gives, on the CPU (inductor
builds C++ there). Each test compiles a 2-layer model, so the suite pays a few seconds of compile time."""
import copy

import pytest
import torch
from torch._dynamo.utils import counters

import lora
import sampling
from conftest import LLAMA, QWEN2, random_model
from test_generate import StubTok


@pytest.mark.parametrize("cfg", [LLAMA, QWEN2], ids=["llama", "qwen2"])
def test_compiled_decoding_gives_the_eager_tokens(cfg):
    eager = random_model(cfg, seed=3, std=0.1)
    compiled = copy.deepcopy(eager).compile_hot_paths()
    counters.clear()
    prompts = [[5, 17, 3, 60], [2, 9, 11, 40, 8, 1, 30]]
    for temperature in (0.0, 1.0):  # 70 tokens: two span buckets, so two compiled shapes
        want = sampling.generate_ids(eager, StubTok(), prompts, 70, temperature, n=2, seed=5)
        got = sampling.generate_ids(compiled, StubTok(), prompts, 70, temperature, n=2, seed=5)
        assert got == want
        assert max(map(len, want)) > 64  # decoding really went past the first bucket
    assert counters["stats"]["unique_graphs"] >= 2  # dynamo really compiled the step (one graph per span bucket)


def test_compiled_training_gives_the_eager_losses_and_adapter():
    eager = random_model(LLAMA, seed=4, std=0.1)
    compiled = copy.deepcopy(eager).compile_hot_paths()
    g = torch.Generator().manual_seed(0)
    ids = lambda k: torch.randint(1, 97, (k,), generator=g).tolist()
    examples = [(ids(p), ids(c)) for p, c in ((9, 4), (20, 7), (5, 12), (14, 3), (30, 9))]  # last step: 1 document
    results, adapters = [], []
    for m in (eager, compiled):
        adapter = lora.inject(m, r=8, alpha=16, targets=("q_proj", "v_proj", "down_proj"), seed=1)
        results.append(lora.train(m, examples, lr=1e-2, epochs=2, batch_size=2, seed=0, adapter=adapter))
        adapters.append(adapter.state_dict())
    (a, b), (sa, sb) = results, adapters
    assert a.failed is None and b.failed is None and a.steps == b.steps == 6
    assert a.losses[-1] < a.losses[0]  # it learned something, so the adapters below are not both zero
    assert b.losses == pytest.approx(a.losses, rel=1e-4)
    for k in sa:
        # Adam divides by sqrt(v): a gradient entry near zero turns float noise into ~1e-5 steps (lr 1e-2). A wrong
        # gradient moves entries by ~lr per step instead.
        assert (sa[k] - sb[k]).abs().max() < 2e-4, k
