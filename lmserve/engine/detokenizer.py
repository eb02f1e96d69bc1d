"""Incremental detokenization: after each step, the text that is safe to show, and stop-string matching.

Each update decodes only a short window of recent token ids (a few already-shown tokens for context, then
the new ones) and emits what the window's text gained. So the cost per call is O(new tokens), whatever the
length of the output. Two kinds of text are held back:
- an incomplete UTF-8 character at the end (decoded as U+FFFD), until the tokens that complete it arrive;
- a tail that could be the start of a stop string (only when the stop string is cut from the output).
Stop strings are matched on the decoded text, in the new text plus len(stop) - 1 characters before it.
"""
from __future__ import annotations

from typing import Any

from lmserve.sampling_params import SamplingParams

# Tokens kept at the start of the window as context, so the next token decodes as it would in the full
# text (e.g. SentencePiece drops the leading space of the first token it decodes).
_NUM_CONTEXT_TOKENS = 4
# Once the window's text ends on a complete character and the window is longer than this, it is cut back to
# the context tokens (one extra decode every ~_MAX_WINDOW tokens).
_MAX_WINDOW = 32
# NOTE: a UTF-8 character spans at most 4 bytes, so in real text a trailing U+FFFD is completed within a few
# tokens (unless token boundaries keep splitting characters, which this also covers). Past this many tokens
# without a clean end the U+FFFD is taken as final: the model emitted invalid UTF-8.
_MAX_UNSETTLED_TOKENS = 32

_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams):
        """tokenizer: an object with `.hf`, a transformers tokenizer."""
        hf = tokenizer.hf
        skip = params.skip_special_tokens
        backend = getattr(hf, "backend_tokenizer", None)
        if backend is not None:
            # the Rust decoder, without transformers' per-call overhead (~3x faster); no space clean-up, which
            # is not stable under appending
            self._decode = lambda ids: backend.decode(ids, skip_special_tokens=skip)
        else:
            self._decode = lambda ids: hf.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
        self._stop = list(params.stop)
        self._include_stop = params.include_stop_str_in_output
        # NOTE: the window starts with the prompt's last tokens, so the first output token keeps the leading
        # space it has after the prompt (as in vLLM); the prompt's own text is never emitted.
        self._window: list[int] = list(prompt_token_ids[-_NUM_CONTEXT_TOKENS:])
        self._num_emitted = len(self._decode(self._window)) if self._window else 0   # chars of window text shown
        self._num_unsettled = 0        # tokens since the window's text last ended on a complete character
        self._text = ""                # all text emitted so far (includes the held-back stop-string prefix)
        self._num_held = 0             # chars at the end of _text that could start a stop string
        self._done = False

    @property
    def output_text(self) -> str:
        return self._text[:-self._num_held] if self._num_held else self._text

    def update(self, new_token_ids: list[int]) -> str | None:
        """Feed new tokens. Returns the stop string if one completed; the text then ends there (or after it)."""
        if self._done or not new_token_ids:
            return None
        window = self._window
        window.extend(new_token_ids)
        text = self._decode(window)
        end = len(text)
        clean = not text.endswith(_REPLACEMENT_CHAR)
        self._num_unsettled = 0 if clean else self._num_unsettled + len(new_token_ids)
        if not clean and self._num_unsettled < _MAX_UNSETTLED_TOKENS:
            # show what comes before the incomplete character already; hold back only the character
            end = len(text.rstrip(_REPLACEMENT_CHAR))
        else:
            clean, self._num_unsettled = True, 0
        delta = text[self._num_emitted:end]
        self._num_emitted = max(self._num_emitted, end)
        if clean and len(window) > _MAX_WINDOW:
            del window[:-_NUM_CONTEXT_TOKENS]
            self._num_emitted = len(self._decode(window))
        return self._append(delta) if delta else None

    def finish(self) -> str:
        """The sequence ended for another reason: release held-back text. Returns the final output text."""
        if not self._done:
            self._done = True
            text = self._decode(self._window)
            self._text += text[self._num_emitted:]          # an incomplete character, shown as U+FFFD
            self._num_held = 0
        return self.output_text

    def _append(self, delta: str) -> str | None:
        old_len = len(self._text)
        self._text += delta
        if not self._stop:
            return None
        text = self._text
        match, match_end = None, 0
        for stop in self._stop:
            i = text.find(stop, max(0, old_len - len(stop) + 1))
            # the stop string that completes first wins (then the one that starts first)
            if i >= 0 and (match is None or (i + len(stop), i) < (match_end, match_end - len(match))):
                match, match_end = stop, i + len(stop)
        if match is not None:
            self._text = text[:match_end if self._include_stop else match_end - len(match)]
            self._num_held = 0
            self._done = True
            return match
        if not self._include_stop:
            # NOTE: with include_stop_str_in_output a stop-string prefix is shown either way, so nothing is held
            self._num_held = _longest_stop_prefix_suffix(text, self._stop)
        return None


def _longest_stop_prefix_suffix(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that is a proper prefix of some stop string."""
    best = 0
    if not text:
        return 0
    last = text[-1]
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if stop[k - 1] == last and text.endswith(stop[:k]):
                best = k
                break
    return best
