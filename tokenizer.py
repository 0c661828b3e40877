"""A thin wrapper over `tokenizers.Tokenizer`: explicit BOS, stop tokens, and hand-written chat formats.

We never let the library add special tokens: the caller decides about BOS. Chat strings are
rendered here rather than by each checkpoint's Jinja template, so they are the same on every
machine and every day (Llama-3.2's template inserts today's date; ours is fixed).
"""
import json
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

# tokens that end a turn or a document in the model families we support
STOP_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|end_of_text|>", "<|endoftext|>")
LLAMA3_DATE = "26 Jul 2024"  # the template's own fallback date; the official SEAL run used the run date


def _load(path):
    return json.loads(path.read_text()) if path.exists() else {}


class Tokenizer:
    def __init__(self, tok, bos_id=None, eos_id=None, pad_id=None, extra_stop_ids=()):
        self.tok = tok
        self.vocab = tok.get_vocab(with_added_tokens=True)
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id = bos_id, eos_id
        self.pad_id = pad_id if pad_id is not None else eos_id  # generation left-pads with it
        self.stop_ids = {eos_id, *extra_stop_ids, *(self.vocab[t] for t in STOP_TOKENS if t in self.vocab)} - {None}
        if "<|start_header_id|>" in self.vocab:
            self.chat_format = "llama3"
        elif "<|im_start|>" in self.vocab:
            self.chat_format = "chatml"
        else:
            self.chat_format = "plain"

    @classmethod
    def from_dir(cls, path):
        """Load tokenizer.json; bos/eos/pad come from tokenizer_config.json, else generation_config.json, else
        config.json. Works for hub folders (Llama-3.x, Qwen2.5) and for those gguf.py writes."""
        path = Path(path)
        tok = _HFTokenizer.from_file(str(path / "tokenizer.json"))
        tok_cfg = _load(path / "tokenizer_config.json")
        configs = [_load(path / "generation_config.json"), _load(path / "config.json")]

        def token_id(name):  # tokenizer_config names the token (a string or {"content": ...}); configs give ids
            if name + "_token" in tok_cfg:  # present but null (Qwen's bos) means: there is none
                t = tok_cfg[name + "_token"]
                t = t["content"] if isinstance(t, dict) else t
                return None if t is None else tok.token_to_id(t)
            for c in configs:
                if c.get(name + "_token_id") is not None:
                    i = c[name + "_token_id"]
                    return i[0] if isinstance(i, list) else i
            return None

        # generation_config may list several eos ids (Llama-3.2: end_of_text, eom, eot): all of them stop
        listed = [i for c in configs if isinstance(c.get("eos_token_id"), list) for i in c["eos_token_id"]]
        return cls(tok, token_id("bos"), token_id("eos"), token_id("pad"), listed)

    def encode(self, text, bos=False):
        """Token ids of text. Special tokens written literally (e.g. <|im_start|>) become their ids; none is added."""
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if bos:
            if self.bos_id is None:
                raise ValueError("this tokenizer has no BOS token")
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, skip_special=False):
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def chat(self, messages, add_generation_prompt=True):
        """Render exactly these messages (no default system prompt) in the model's chat format.

        The llama3 string starts with <|begin_of_text|>, so encode it with bos=False: one BOS, where
        the official SEAL code had two (the template's plus the tokenizer's)."""
        if self.chat_format == "llama3":
            # Llama-3.2's template without tools: a system block always comes first, contents are trimmed
            system = ""
            if messages and messages[0]["role"] == "system":
                system, messages = messages[0]["content"].strip(), messages[1:]
            head = lambda role: f"<|start_header_id|>{role}<|end_header_id|>\n\n"
            s = ("<|begin_of_text|>" + head("system") +
                 f"Cutting Knowledge Date: December 2023\nToday Date: {LLAMA3_DATE}\n\n{system}<|eot_id|>")
            s += "".join(head(m["role"]) + m["content"].strip() + "<|eot_id|>" for m in messages)
            return s + (head("assistant") if add_generation_prompt else "")
        if self.chat_format == "chatml":
            s = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
            return s + ("<|im_start|>assistant\n" if add_generation_prompt else "")
        raise ValueError("this tokenizer has no chat format (no <|start_header_id|> or <|im_start|> token)")

    def chat_ids(self, messages, add_generation_prompt=True):
        return self.encode(self.chat(messages, add_generation_prompt))
