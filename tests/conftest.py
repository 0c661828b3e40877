import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import checkpoint  # noqa: E402
import model  # noqa: E402

# Tiny configs as the hub writes them. head_dim 16 with a short original context makes llama3 rope scaling
# touch most frequencies, so a wrong rotary embedding shows up in the logits.
LLAMA = dict(model_type="llama", vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
             max_position_embeddings=256, tie_word_embeddings=False,
             rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                               original_max_position_embeddings=16))
LLAMA_TIED = {**LLAMA, "tie_word_embeddings": True, "rope_scaling": None, "num_key_value_heads": 4}
QWEN2 = dict(model_type="qwen2", vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0,
             max_position_embeddings=256, tie_word_embeddings=False, use_sliding_window=False)


def random_model(hf_config: dict, seed=0, std=0.2) -> model.Transformer:
    """Random weights drawn large (std 0.2) so attention is far from uniform and rotary errors are visible."""
    torch.manual_seed(seed)
    m = model.Transformer(model.Config.from_hf(hf_config))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, std)
    return m.eval()


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real offline model, converted once per machine into the cache folder."""
    import convert_gguf as gguf
    return gguf.ensure_default_model()


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory, smollm2_dir):
    """A 2-layer random Llama with the real SmolLM2 tokenizer (so chat formatting and parsing are real), saved as a
    hub-style folder: what the loop and the domains run on in the tests."""
    d = tmp_path_factory.mktemp("tiny-chat")
    checkpoint.save(random_model({**LLAMA, "vocab_size": 49152, "bos_token_id": 1, "eos_token_id": 2}, std=0.02), d,
                    tokenizer_dir=smollm2_dir)
    return d
