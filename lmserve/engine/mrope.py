"""M-RoPE positions (Qwen2-VL / Qwen2.5-VL; model/qwen2_vl.py): three streams (temporal, height, width) per token.

Text tokens advance all three together; an image's tokens sit on its merged grid, at (start, start + row,
start + column), and the text after it resumes at start + max(rows, columns). So past the prompt a token's
positions are no longer its index: they are index + `mrope_delta` (the largest prompt position + 1 - prompt length;
vLLM's `mrope_position_delta`), negative after an image. The prompt's streams are computed once per sequence from
its image items and kept on the Sequence; chunked prefill, prefix-cache hits (which skip computing a prefix, not
its positions), preemption recomputes and decode all read positions from there, so they agree whatever the split.
Pure Python, no torch."""
from __future__ import annotations


def prompt_positions(num_prompt_tokens: int, items) -> tuple[list[list[int]], int]:
    """-> (the prompt's [t, h, w] position streams, mrope_delta). items: the sequence's MMItems, in prompt order,
    each with data["llm_grid"] = (t, rows, columns) of its merged tokens."""
    streams: list[list[int]] = [[], [], []]
    pos = index = 0
    for m in sorted(items, key=lambda m: m.offset):
        text = m.offset - index
        for s in streams:
            s.extend(range(pos, pos + text))
        pos += text
        t, rows, cols = m.data["llm_grid"]
        if t * rows * cols != m.length:
            raise ValueError(f"an image of {m.length} tokens has a {t}x{rows}x{cols} grid")
        for ti in range(t):
            for r in range(rows):
                streams[0].extend([pos + ti] * cols)
                streams[1].extend([pos + r] * cols)
                streams[2].extend(range(pos, pos + cols))
        pos += max(rows, cols)
        index = m.end
    text = num_prompt_tokens - index
    for s in streams:
        s.extend(range(pos, pos + text))
    return streams, pos + text - num_prompt_tokens


def mrope_positions(seq, start: int, num: int) -> list[list[int]]:
    """The three position streams of tokens [start, start + num) of seq."""
    if not seq.mm_items:
        return [list(range(start, start + num))] * 3
    if seq.mrope_positions is None:
        seq.mrope_positions, seq.mrope_delta = prompt_positions(seq.num_prompt_tokens, seq.mm_items)
    n_prompt = seq.num_prompt_tokens
    end = start + num
    head = [s[start:min(end, n_prompt)] for s in seq.mrope_positions]
    tail = list(range(max(start, n_prompt) + seq.mrope_delta, end + seq.mrope_delta))
    return [h + tail for h in head]
