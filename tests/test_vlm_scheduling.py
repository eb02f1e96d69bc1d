"""Images under the token budget (engine/mm_items.py), pure Python: a chunk that starts an image's encoder pays
for it, so many images are spread over steps instead of making one step long; an image too big for the budget
still runs alone; prefix-cache keys differ for different images of the same tokens."""
from __future__ import annotations

from types import SimpleNamespace

from lmserve.engine.mm_items import MMItem, block_key, fit_budget


def seq_with(items, num_tokens=200):
    return SimpleNamespace(mm_items=items, token_ids=[5] * num_tokens)


def image(offset, length=16, h=1):
    return MMItem(offset, length, h, {})


def test_chunk_stops_before_an_image_it_cannot_encode():
    seq = seq_with([image(10), image(40)])
    assert fit_budget(seq, 0, 64, 64, first=True) == 40     # 10 text + image 1 (16 + 16 encoder) fit; image 2 not
    assert fit_budget(seq, 0, 20, 20, first=False) == 10     # only the text before the first image
    assert fit_budget(seq_with([]), 0, 20, 20, first=False) == 20


def test_an_image_too_big_runs_alone_but_not_beside_others():
    seq = seq_with([image(0, length=50)])
    assert fit_budget(seq, 0, 32, 32, first=True) == 32      # nothing else in the step: progress anyway
    assert fit_budget(seq, 0, 32, 32, first=False) == 0      # decodes were scheduled: wait for a step of its own
    seq.mm_items[0].embeds = object()                        # encoded: the rest of its tokens cost only themselves
    assert fit_budget(seq, 32, 18, 32, first=False) == 18


def test_block_keys_carry_the_image_hash():
    a, b = seq_with([image(4, h=1)]), seq_with([image(4, h=2)])
    assert block_key(a, 0, 8) != block_key(b, 0, 8)          # same tokens, different pictures
    assert block_key(a, 3, 8) == block_key(b, 3, 8)          # past the image: tokens only (the chain differs)
    assert block_key(seq_with([]), 0, 8) == tuple([5] * 8)
