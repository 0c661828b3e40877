"""tokenizer.py: round trips, ids equal to transformers', pinned chat strings, and special ids per format."""
import json

import pytest
from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

from tokenizer import Tokenizer

TEXTS = ["0123456789 and 3.14159, 2024-07-26", "a\tb\t\tc", "two  spaces   three", "lines\n\nand\r\nmore\n",
         "café, naïve, Ångström, Œuvre", "日本語のテキスト、中文文本", "emoji 🎉🚀👍🏽 end",
         " leading and trailing  ",
         "<|im_start|>user\nhi<|im_end|>"]
CONVO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
         {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    return Tokenizer.from_dir(smollm2_dir)


@pytest.fixture(scope="module")
def hf_smol(smollm2_dir):
    """transformers' tokenizers: from tokenizer.json alone, and from the folder as AutoTokenizer reads it."""
    transformers = pytest.importorskip("transformers")
    return (transformers.PreTrainedTokenizerFast(tokenizer_file=str(smollm2_dir / "tokenizer.json")),
            transformers.AutoTokenizer.from_pretrained(smollm2_dir))


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_and_ids_match_transformers(smol, hf_smol, text):
    ids = smol.encode(text)
    assert smol.decode(ids) == text
    for ref in hf_smol:
        assert ids == ref(text, add_special_tokens=False)["input_ids"] and ref.decode(ids) == text


def test_smollm2_specials(smol):
    assert (smol.bos_id, smol.eos_id, smol.pad_id, smol.vocab_size) == (1, 2, 2, 49152)
    assert smol.stop_ids == {2, 0}  # <|im_end|>, <|endoftext|>
    assert smol.chat_format == "chatml"
    assert smol.encode("hi") == [6004] and smol.encode("hi", bos=True) == [1, 6004]  # BOS only when asked
    assert smol.decode([1, 6004, 2], skip_special=True) == "hi"


def test_chatml_pinned(smol):
    msgs = [{"role": "user", "content": "Hi!"}]
    assert smol.chat(msgs) == "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    assert smol.chat(msgs, add_generation_prompt=False) == "<|im_start|>user\nHi!<|im_end|>\n"
    # the same ids as transformers builds from the GGUF itself (checked once with the `gguf` package installed)
    assert smol.chat_ids(msgs) == [1, 4093, 198, 26843, 17, 2, 198, 1, 520, 9531, 198]


def test_chatml_matches_the_gguf_template(smol, hf_smol):
    ref = hf_smol[1]
    assert "<|im_start|>" in ref.chat_template  # copied from the GGUF's tokenizer.chat_template
    for gen in (True, False):
        want = ref.apply_chat_template(CONVO, tokenize=False, add_generation_prompt=gen)
        assert smol.chat(CONVO, add_generation_prompt=gen) == want
    # without a system message the template injects its own; we render exactly the given messages
    assert not smol.chat(CONVO[1:]).startswith("<|im_start|>system")


def tiny_dir(tmp_path, specials, tok_cfg, configs=None):
    """A hub-style tokenizer folder: byte-level BPE with no merges, plus special tokens after the 256 bytes."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = HFTokenizer(models.BPE({c: i for i, c in enumerate(sorted(alphabet))}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    for name, cfg in (configs or {}).items():
        (tmp_path / name).write_text(json.dumps(cfg))
    return tmp_path


LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eom_id|>", "<|eot_id|>"]  # ids 256-261


def test_llama3(tmp_path):
    d = tiny_dir(tmp_path, LLAMA3_SPECIALS,
                 {"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|eot_id|>", "special": True}},
                 {"generation_config.json": {"bos_token_id": 256, "eos_token_id": [257, 260, 261]},
                  "config.json": {"bos_token_id": 256, "eos_token_id": [257, 260, 261]}})
    tok = Tokenizer.from_dir(d)
    assert (tok.chat_format, tok.bos_id, tok.eos_id, tok.pad_id) == ("llama3", 256, 261, 261)
    assert tok.stop_ids == {257, 260, 261}
    msgs = [{"role": "system", "content": "Be brief. \n"}, {"role": "user", "content": " Hi!\n"},
            {"role": "assistant", "content": "Hello."}]
    assert tok.chat(msgs) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    # no system message: the system block is still there, with an empty system prompt
    assert tok.chat(msgs[1:2], add_generation_prompt=False) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>")
    ids, nl = tok.chat_ids(msgs), tok.tok.token_to_id("Ċ")  # Ċ is "\n" in the byte-level alphabet
    assert ids[:3] == [256, 258, tok.tok.token_to_id("s")] and ids[-3:] == [259, nl, nl]
    assert ids.count(256) == 1  # one BOS: it is part of the string, and encode adds none
    assert tok.decode(ids) == tok.chat(msgs)


def test_qwen_style(tmp_path):
    d = tiny_dir(tmp_path, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                 {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
                 {"config.json": {"bos_token_id": 256, "eos_token_id": 258},
                  "generation_config.json": {"bos_token_id": 256, "eos_token_id": [258, 256], "pad_token_id": 256}})
    tok = Tokenizer.from_dir(d)
    assert (tok.chat_format, tok.bos_id, tok.eos_id, tok.pad_id) == ("chatml", None, 258, 256)
    assert tok.stop_ids == {256, 258}
    with pytest.raises(ValueError, match="no BOS"):
        tok.encode("x", bos=True)
    assert tok.encode("<|im_start|>a<|im_end|>") == [257, tok.tok.token_to_id("a"), 258]


def test_plain_has_no_chat(tmp_path):
    tok = Tokenizer.from_dir(tiny_dir(tmp_path, ["</s>"], {}, {"config.json": {"eos_token_id": 256}}))
    assert (tok.chat_format, tok.bos_id, tok.eos_id, tok.stop_ids) == ("plain", None, 256, {256})
    with pytest.raises(ValueError, match="no chat format"):
        tok.chat([{"role": "user", "content": "hi"}])
