"""Guided (constrained) decoding with xgrammar: grammar compilation with a cache, one matcher per sequence, and a
token bitmask applied to the logits of the constrained rows before the sampler's other stages.

Compilation happens off the engine thread (AsyncEngine compiles in a worker thread before queueing the request,
so a bad schema is an error before anything is queued); the engine thread only creates matchers (cheap), fills
bitmasks and advances matchers. A batch with no constrained row never reaches this module.

NOTE: preemption-by-recompute keeps a sequence's output tokens, and a matcher is advanced only by tokens that
were appended to the sequence, so a recomputed sequence's matcher is already in the right state.

One feature, two modules, two names on purpose: this is the engine half (grammars, matchers, bitmasks; named
after what it does to decoding and after `SamplingParams.guided`, vLLM's `GuidedDecodingParams`);
server/structured.py is the API half, named after the request fields it reads (OpenAI's "structured outputs",
vLLM's `structured_outputs`). The server half never touches a grammar; this half never sees a request body.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from lmserve.sampling_params import GuidedDecodingParams, SamplingParamsError

logger = logging.getLogger(__name__)

MAX_CACHED_GRAMMARS = 512


@dataclass
class CompileStats:
    num_compiled: int = 0          # cold compilations
    num_cache_hits: int = 0
    compile_seconds: float = 0.0   # total time of the cold compilations


class GrammarCache:
    """Compiles GuidedDecodingParams to xgrammar grammars; the same constraint twice compiles once.
    Thread-safe; xgrammar is imported on first use so that servers that never constrain do not pay for it."""

    def __init__(self, hf_tokenizer, vocab_size: int, stop_token_ids: frozenset[int]):
        self._hf = hf_tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self._compiler = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple, object] = OrderedDict()
        self.stats = CompileStats()

    def _get_compiler(self):
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr
                info = xgr.TokenizerInfo.from_huggingface(self._hf, vocab_size=self.vocab_size,
                                                          stop_token_ids=self.stop_token_ids)
                # NOTE: our own cache below is the one that counts; xgrammar's is off so that memory is bounded
                self._compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
            return self._compiler

    def compile(self, g: GuidedDecodingParams):
        """-> xgrammar.CompiledGrammar. A bad schema / regex / grammar raises SamplingParamsError(g.param)."""
        key = g.key
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.stats.num_cache_hits += 1
                return hit
        compiler = self._get_compiler()
        t0 = time.perf_counter()
        try:
            compiled = _compile(compiler, g)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise SamplingParamsError(g.param, f"{g.param}: {_clean_error(exc)}") from exc
        with self._lock:
            self.stats.num_compiled += 1
            self.stats.compile_seconds += time.perf_counter() - t0
            self._cache[key] = compiled
            while len(self._cache) > MAX_CACHED_GRAMMARS:
                self._cache.popitem(last=False)
        return compiled

    def new_state(self, g: GuidedDecodingParams) -> GuidedState:
        import xgrammar as xgr
        return GuidedState(xgr.GrammarMatcher(self.compile(g)), g.start_after)


def _compile(compiler, g: GuidedDecodingParams):
    # NOTE: no free whitespace between JSON tokens: small models at temperature > 0 otherwise wander into
    # endless runs of spaces and newlines that the grammar allows.
    if g.json is not None:
        return compiler.compile_json_schema(g.json, any_whitespace=False, strict_mode=True)
    if g.json_object:
        return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
    if g.regex is not None:
        return compiler.compile_regex(g.regex)
    if g.choice is not None:
        alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in g.choice)
        return compiler.compile_grammar(f"root ::= {alternatives}")
    return compiler.compile_grammar(g.grammar)


def _clean_error(exc: BaseException) -> str:
    # xgrammar's messages start with "[hh:mm:ss] /path/file.cc:123: "; keep the part a user can act on
    msg = str(exc).strip()
    if msg.startswith("[") and ": " in msg:
        parts = msg.split(": ", 1)
        if ".cc:" in parts[0] or ".h:" in parts[0]:
            msg = parts[1]
    return msg.splitlines()[0] if msg else type(exc).__name__


class GuidedState:
    """Per-sequence grammar state (lives on Sequence.guided)."""
    __slots__ = ("matcher", "start_after", "is_active", "is_failed")

    def __init__(self, matcher, start_after: str | None):
        self.matcher = matcher
        self.start_after = start_after
        self.is_active = start_after is None
        self.is_failed = False

    def accept(self, token_id: int, output_text: str) -> None:
        """Advance by a token that was appended to the sequence."""
        if not self.is_active:
            if self.start_after in output_text:
                self.is_active = True
            return
        if self.is_failed or self.matcher.is_terminated():
            return
        if not self.matcher.accept_token(token_id):
            # only possible when another stage (e.g. min_tokens banning the end) left no allowed token
            logger.warning("guided decoding: token %d rejected by the grammar; constraint dropped", token_id)
            self.is_failed = True

    @property
    def constrains(self) -> bool:
        return self.is_active and not self.is_failed and not self.matcher.is_terminated()


def apply_bitmask(logits: torch.Tensor, rows: list[tuple[int, GuidedState]]) -> None:
    """logits: [num_seqs, vocab] (fp32, in place); rows: (row, state) of the constrained rows. Tokens the
    grammar does not allow next become -inf (EOS only where the grammar may end)."""
    import xgrammar as xgr
    active = [(r, st) for r, st in rows if st.constrains]
    if not active:
        return
    vocab = logits.shape[-1]
    # NOTE: empty, not xgr.allocate_token_bitmask's torch.full: only the filled rows are read
    bitmask = torch.empty((logits.shape[0], (vocab + 31) // 32), dtype=torch.int32)   # [num_seqs, words]
    for r, st in active:
        st.matcher.fill_next_token_bitmask(bitmask, r)
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab, indices=[r for r, _ in active])
