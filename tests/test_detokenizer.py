"""IncrementalDetokenizer with the real SmolLM2 byte-level BPE tokenizer (from the bundled GGUF, cached)."""
import itertools
import random

import pytest

from lmserve.engine import detokenizer as detok_mod
from lmserve.engine.detokenizer import IncrementalDetokenizer
from lmserve.sampling_params import SamplingParams
from lmserve.tokenizer import load_tokenizer

TEXTS = {
    "english": "Hello world! The quick brown fox jumps over the lazy dog, twice.\nNew line:   spaces  kept.",
    "emoji": "I love 🍕 and 🎉🎉! Family: 👨‍👩‍👧 flags 🇫🇷🇯🇵 and 🤖🦄✨ done.",
    "cjk": "日本語のテキストです。中文也可以。한국어 텍스트도 있습니다。",
    "accented": "Café naïve façade résumé Ünïcödé — Ångström, Øresund, Łódź, ça va?",
    "mixed": "Mix: naïve 🍕 日本 résumé 🎉 한국 Ünïcödé 👨‍👩‍👧 end.",
}


@pytest.fixture(scope="module")
def tok(smollm2_path):
    return load_tokenizer(smollm2_path)


def encode(tok, text):
    return tok.hf.encode(text, add_special_tokens=False)


def stream(tok, ids, prompt=(), chunk=1, **params):
    """Feed ids `chunk` at a time. Returns (detokenizer, output_text after each update, stop string or None)."""
    d = IncrementalDetokenizer(tok, list(prompt), SamplingParams(**params))
    seen = []
    for i in range(0, len(ids), chunk):
        stop = d.update(ids[i:i + chunk])
        seen.append(d.output_text)
        if stop is not None:
            return d, seen, stop
    return d, seen, None


def assert_prefixes(seen, final):
    for i, text in enumerate(seen):
        assert final.startswith(text), (i, text, final)
    for a, b in itertools.pairwise(seen):
        assert b.startswith(a)


@pytest.mark.parametrize("name", list(TEXTS))
@pytest.mark.parametrize("chunk", [1, 3])
def test_streaming_reproduces_full_decode(tok, name, chunk):
    ids = encode(tok, TEXTS[name] * 3)                 # long enough to slide the decode window
    prompt = encode(tok, "<|im_start|>user\nSay something<|im_end|>\n<|im_start|>assistant\n")
    d, seen, stop = stream(tok, ids, prompt=prompt, chunk=chunk)
    expected = tok.hf.decode(ids, skip_special_tokens=True)
    assert stop is None
    assert d.output_text == expected
    assert d.finish() == expected
    assert_prefixes(seen, expected)
    assert all("\ufffd" not in text for text in seen)


def test_partial_utf8_is_held_until_complete(tok):
    ids = encode(tok, "ok 🍕")
    pieces = [tok.hf.decode([i]) for i in ids]
    assert "\ufffd" in "".join(pieces)                   # the emoji really is split over tokens
    _d, seen, _ = stream(tok, ids)
    assert seen[-1] == "ok 🍕"
    first_partial = next(i for i, p in enumerate(pieces) if "\ufffd" in p)
    # the space sharing a token with the emoji's first bytes is shown at once; the bytes wait for the rest
    assert seen[first_partial - 1] == "ok"
    assert all(text == "ok " for text in seen[first_partial:-1]) and first_partial < len(ids) - 1
    assert "\ufffd" not in "".join(seen)


def test_finish_releases_incomplete_utf8(tok):
    ids = encode(tok, "ab 🍕")
    d, _seen, _ = stream(tok, ids[:-1])                  # the emoji's last byte never comes
    assert "\ufffd" not in d.output_text
    final = d.finish()
    assert final == tok.hf.decode(ids[:-1]) and final.endswith("\ufffd")
    assert d.update(ids[-1:]) is None and d.output_text == final      # finished: further tokens are ignored


def test_leading_space_of_first_output_token(tok):
    prompt = encode(tok, "Hello")
    ids = encode(tok, " world, again")
    d, _, _ = stream(tok, ids, prompt=prompt)
    assert d.output_text == " world, again"


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tok, skip):
    ids = encode(tok, "Hi there") + [tok.hf.convert_tokens_to_ids("<|im_end|>")] + encode(tok, "\nnext 🎉")
    d, seen, _ = stream(tok, ids, skip_special_tokens=skip)
    expected = tok.hf.decode(ids, skip_special_tokens=skip)
    assert d.output_text == expected
    assert ("<|im_end|>" in expected) is not skip
    assert_prefixes(seen, expected)


def _stop_spanning(tok, text, first, num_tokens):
    """A stop string that starts inside token `first` and ends inside token first + num_tokens - 1."""
    ids = encode(tok, text)
    pieces = [tok.hf.decode([i]) for i in ids]
    assert all(len(p) >= 2 for p in pieces[first:first + num_tokens])
    stop = pieces[first][1:] + "".join(pieces[first + 1:first + num_tokens - 1]) + pieces[first + num_tokens - 1][:-1]
    before = "".join(pieces[:first]) + pieces[first][:1]
    return ids, stop, before


@pytest.mark.parametrize("num_tokens", [2, 3])
def test_stop_string_spanning_tokens(tok, num_tokens):
    text = "The answer is forty two and then some more words follow here."
    ids, stop, before = _stop_spanning(tok, text, 3, num_tokens)
    assert text.count(stop) == 1
    d, seen, matched = stream(tok, ids, stop=[stop, "never matches"])
    assert matched == stop
    assert len(seen) == 3 + num_tokens                   # stopped on the token that completed it
    assert d.output_text == before
    assert_prefixes(seen, before)                        # no prefix of the stop string was ever shown
    assert d.finish() == before
    assert d.update(ids[-2:]) is None and d.output_text == before


def test_include_stop_str_in_output(tok):
    text = "The answer is forty two and then some more words follow here."
    ids, stop, before = _stop_spanning(tok, text, 3, 3)
    d, seen, matched = stream(tok, ids, stop=[stop], include_stop_str_in_output=True)
    assert matched == stop
    assert d.output_text == before + stop
    assert_prefixes(seen, before + stop)


def test_partial_stop_prefix_is_held_then_released(tok):
    text = "Count: 1, 2, 3. Then 4, 5."
    ids = encode(tok, text)
    d = IncrementalDetokenizer(tok, [], SamplingParams(stop=["3, 4", "xyz"]))
    shown = []
    for i in ids:
        assert d.update([i]) is None
        shown.append(d.output_text)
    # right after "3" arrives it is held (it could start "3, 4"); "." shows it is not the stop string
    i3 = next(i for i, s in enumerate(shown) if "1, 2, " in s and tok.hf.decode(ids[:i + 1]).endswith("3"))
    assert shown[i3] == "Count: 1, 2, "
    assert shown[i3 + 1] == "Count: 1, 2, 3."
    assert d.output_text == text
    assert_prefixes(shown, text)


def test_finish_releases_held_stop_prefix(tok):
    ids = encode(tok, "value is 4")
    d, _seen, matched = stream(tok, ids, stop=["42"])
    assert matched is None and d.output_text == "value is "
    assert d.finish() == "value is 4"


def test_earliest_stop_wins_and_stop_inside_one_token(tok):
    ids = encode(tok, "alpha beta gamma delta")
    d, _, matched = stream(tok, ids, chunk=len(ids), stop=["delta", "beta", "a b"])
    assert matched == "a b" and d.output_text == "alph"
    d, _, matched = stream(tok, ids, stop=["et"])
    assert matched == "et" and d.output_text == "alpha b"
    d, _, matched = stream(tok, ids, stop=["al"])
    assert matched == "al" and d.output_text == ""


def test_random_tokens_match_full_decode(tok):
    """Arbitrary ids (invalid UTF-8 runs, specials): streamed text + finish() == decode(all ids)."""
    rng = random.Random(0)
    vocab = len(tok.hf)
    for trial in range(5):
        ids = [rng.randrange(vocab) for _ in range(300)]
        d, seen, _ = stream(tok, ids, chunk=1 + trial % 3)
        expected = tok.hf.decode(ids, skip_special_tokens=True)
        assert d.finish() == expected
        assert_prefixes(seen, expected)


def test_cost_per_update_is_bounded(tok):
    ids = encode(tok, " ".join(TEXTS.values()) * 8)
    assert len(ids) > 500
    d = IncrementalDetokenizer(tok, [], SamplingParams(stop=["never seen"]))
    sizes = []
    decode = d._decode
    d._decode = lambda window: sizes.append(len(window)) or decode(window)
    for i in ids:
        d.update([i])
    assert d.output_text == tok.hf.decode(ids)
    # the window is cut back only at a clean end, so it can run a few tokens (one split character) past the max
    assert max(sizes) <= detok_mod._MAX_WINDOW + 4


def test_invalid_utf8_run_is_not_held_forever(tok):
    lead_byte = tok.hf.convert_tokens_to_ids("ð")          # byte 0xF0 alone: a 4-byte lead never completed
    ids = [lead_byte] * (detok_mod._MAX_UNSETTLED_TOKENS + 8)
    d, seen, _ = stream(tok, ids)
    assert seen[detok_mod._MAX_UNSETTLED_TOKENS - 2] == ""
    assert seen[-1].startswith("\ufffd" * detok_mod._MAX_UNSETTLED_TOKENS)
    assert d.finish() == tok.hf.decode(ids)
