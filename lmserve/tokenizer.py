"""Tokenizer wrapper: encode/decode, chat template rendering, eos ids.

GGUF files carry their vocabulary; transformers converts it to a fast tokenizer (1-5 s on 2 cores), so the converted
tokenizer is saved under `$LMSERVE_TOKENIZER_CACHE` (default `~/.cache/lmserve/tokenizers`) as `<arch>-<key>` and
loaded from there afterwards. The key is a digest of the file's tokenizer fields: every quantization of one model,
a copy or a move of the file, share one entry, and the cache holds one entry per tokenizer, not per file.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile

from lmserve.model.gguf import gguf_reader, lazy_reader_for_transformers
from lmserve.model.loader import is_gguf, load_eos_token_ids
from lmserve.startup import phase

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "lmserve")

# Used (with a warning) when neither the model nor the user gives a chat template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Gemma's turn format, for GGUF files that carry no template (llama.cpp's GGUF-my-repo conversions of Gemma 3):
# roles user / model, a system message folded into the first user turn, BOS written by the template.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% set content = message['content'] if message['content'] is string else "
    "message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
    "{% if message['role'] == 'system' %}{% set ns.system = content + '\n\n' %}"
    "{% else %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
    "{% if message['role'] == 'user' %}{{ ns.system }}{% set ns.system = '' %}{% endif %}"
    "{{ content | trim + '<end_of_turn>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


class Tokenizer:
    def __init__(self, hf, eos_token_ids: frozenset[int], chat_template: str | None):
        self.hf = hf                                   # transformers.PreTrainedTokenizerBase
        self.eos_token_ids = eos_token_ids
        self.bos_token_id: int | None = hf.bos_token_id
        self.vocab_size = len(hf)                      # includes added tokens
        self.chat_template = chat_template

    @functools.cached_property
    def max_token_chars(self) -> int:
        """An upper bound on the characters one token decodes to (the longest vocabulary entry: byte-level and
        SentencePiece pieces spell each byte or space with at least one character), so a text longer than
        max_model_len * max_token_chars cannot fit the session, and is refused without tokenizing it."""
        return max(1, max((len(t) for t in self.hf.get_vocab()), default=1))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        return self.hf.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                           add_generation_prompt=add_generation_prompt, **kwargs)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        # NOTE: the template writes any BOS itself; adding special tokens again would double it (as in HF's
        # apply_chat_template(tokenize=True), which this matches).
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False)


def _cache_key(path: str) -> str:
    """`<arch>-<digest>` of the bytes of every tokenizer.* field and the architecture (which picks transformers'
    converter and tokenizer class): what the conversion reads. A few MB hashed from the metadata the start-up parses
    anyway (the reader is shared), where a key of path, size and mtime made a new entry for every copy of a file."""
    reader = gguf_reader(path)
    fields = sorted(reader.fields.values(), key=lambda f: f.offset)
    end = reader.tensors[0].field.offset if len(reader.tensors) else len(reader.data)
    arch = reader.fields.get("general.architecture")
    arch = str(arch.contents()) if arch is not None else "unknown"
    digest = hashlib.sha256(arch.encode())
    for field, nxt in zip(fields, fields[1:] + [None]):
        if field.name.startswith("tokenizer."):
            digest.update(reader.data[field.offset:nxt.offset if nxt is not None else end])
    return f"{re.sub(r'[^A-Za-z0-9_.]', '_', arch)}-{digest.hexdigest()[:24]}"


def tokenizer_cache_path(gguf_path: str, cache_dir: str | None = None) -> str:
    """Where the tokenizer converted from `gguf_path` is (or will be) cached: `<cache_dir>/tokenizers/<key>`
    when a cache_dir is given, else under $LMSERVE_TOKENIZER_CACHE (default ~/.cache/lmserve/tokenizers)."""
    if cache_dir is not None:
        root = os.path.join(os.path.expanduser(cache_dir), "tokenizers")
    else:
        root = os.path.expanduser(os.environ.get("LMSERVE_TOKENIZER_CACHE")
                                  or os.path.join(DEFAULT_CACHE_DIR, "tokenizers"))
    return os.path.join(root, _cache_key(gguf_path))


def _load_gguf_tokenizer(path: str, cache_dir: str | None):
    # NOTE: PreTrainedTokenizerFast alone: naming AutoTokenizer makes transformers index every model family it
    # ships (0.3-0.5 s of a server's start on a 2-core VM); only the one-time conversion needs it
    from transformers import PreTrainedTokenizerFast
    cached = tokenizer_cache_path(path, cache_dir)
    if os.path.isfile(os.path.join(cached, "tokenizer_config.json")):
        # NOTE: our own save of the conversion below: its tokenizer.json is the whole pipeline, so it loads as
        # is. AutoTokenizer would pick the model's class (GemmaTokenizer, LlamaTokenizer...), which parses the
        # vocabulary and merges in Python and rebuilds the same tokenizer: for Gemma 3's 262k tokens 1.4 s more
        # and 164 MiB more kept for the server's life (tests/test_tokenizer.py checks both load the same).
        hf = PreTrainedTokenizerFast.from_pretrained(cached)
        _list_added_tokens(hf, cached)       # an entry an older lmserve wrote: once
        return hf
    from transformers import AutoTokenizer
    with phase(logger, "converting the GGUF tokenizer (once)", done=f"cached in {cached}"), \
            lazy_reader_for_transformers():
        hf = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path))
    try:
        # NOTE: write to a temp dir and rename, so concurrent processes never see a half-written cache entry.
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(cached), prefix=".tmp-")
        hf.save_pretrained(tmp)
        _list_added_tokens(hf, tmp)
        try:
            os.rename(tmp, cached)
        except OSError:                                # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        logger.warning("could not cache the converted tokenizer in %s: %s", cached, e)
    return hf


def _list_added_tokens(hf, saved_dir: str) -> None:
    """List hf's added tokens in saved_dir's tokenizer_config.json (`added_tokens_decoder`, the format transformers
    4.x writes itself) where they are not yet. Why: transformers 5's save_pretrained leaves them out, and a load
    whose config lacks them parses the whole tokenizer.json once more in Python just to find them: for Gemma 3's
    262k vocabulary (33 MB, 6384 added tokens) 0.8 s of every start on a 2-core VM. A cache that cannot be written
    stays as it is (each start then pays that parse)."""
    path = os.path.join(saved_dir, "tokenizer_config.json")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        # NOTE: a text search, not a parse: the config is parsed by from_pretrained already (1.1 MB for Gemma 3)
        if '"added_tokens_decoder"' in text:
            return
        config = json.loads(text)
        config["added_tokens_decoder"] = {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(hf.added_tokens_decoder.items())}
        # NOTE: a new file renamed over the old, so a process loading the entry meanwhile reads one whole version
        fd, tmp = tempfile.mkstemp(dir=saved_dir, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2, ensure_ascii=False)
            shutil.copymode(path, tmp)
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as e:
        logger.debug("could not list the added tokens in %s: %s", path, e)


def _resolve_chat_template(override: str | None, hf) -> str:
    if override is not None:
        if os.path.isfile(override):
            with open(override) as f:
                return f.read()
        return override
    if getattr(hf, "chat_template", None):
        return hf.chat_template
    if "<start_of_turn>" in hf.get_vocab():
        logger.info("the model has no chat template; using Gemma's turn format")
        return GEMMA_TEMPLATE
    logger.warning("the model has no chat template; using a plain ChatML template (override with chat_template)")
    return CHATML_TEMPLATE


def load_hf_tokenizer(source: str, cache_dir: str | None = None):
    """The Hugging Face tokenizer alone, from a GGUF file (converted once, then cached) or an HF directory: what
    a client needs to count and make tokens, without the model's metadata (a GGUF's full parse, ~6 s for a 262k
    vocabulary, is only needed for its end-of-sequence ids)."""
    if is_gguf(source):
        return _load_gguf_tokenizer(source, cache_dir)
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(source)


def load_tokenizer(model_path: str, tokenizer_path: str | None = None, chat_template: str | None = None,
                   cache_dir: str | None = None) -> Tokenizer:
    """`model_path`: a GGUF file or HF directory (already resolved). `tokenizer_path` defaults to it.

    `chat_template`: a Jinja template string or a path to a file holding one; default: the model's own.
    `cache_dir`: where GGUF tokenizers are cached (default ~/.cache/lmserve).
    """
    hf = load_hf_tokenizer(tokenizer_path or model_path, cache_dir)
    template = _resolve_chat_template(chat_template, hf)
    hf.chat_template = template
    eos = set(load_eos_token_ids(model_path) if os.path.exists(model_path) else ())
    if hf.eos_token_id is not None:
        eos.add(hf.eos_token_id)
    return Tokenizer(hf, frozenset(eos), template)
