"""Images inside a sequence, as the scheduler and the block manager see them. Pure Python, no torch.

An image is a run of image tokens in the prompt (`MMItem.offset`, `.length`) whose embeddings come from the vision
encoder instead of the embedding table. Two rules follow:
- Prefix cache: equal image tokens do not mean equal images, so a block covering any image token is keyed by its
  tokens plus the content hash of each image it overlaps (`block_key`). The block hashes are chained, so every
  later block differs too.
- Token budget: the encoder runs over a whole image the first time any of its tokens is scheduled, so that step
  pays for the image's tokens once more (`fit_budget`): a request with many images is prefilled over more steps
  instead of making one step long for everyone decoding.
- Bidirectional images (Gemma 3: `MMItem.bidirectional`): the image's tokens attend to each other both ways, so
  they must be computed in one chunk. A chunk never ends inside such an image (`fit_budget`) and a prefix-cache
  hit that ends inside one is cut back to its start (`whole_image_prefix`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(eq=False)
class MMItem:
    offset: int                 # the first image token's position in the prompt
    length: int                 # its number of image tokens (what the HF processor expands the placeholder to)
    content_hash: int           # of the decoded pixels: equal images share cache blocks, different ones never do
    data: dict[str, Any]        # the processor's tensors for this image (pixel_values, ...): the encoder's input
    embeds: Any = None          # the encoder's output [length, hidden] once computed; kept until the request ends
    bidirectional: bool = False  # its tokens attend to each other both ways (Gemma 3): never split across chunks

    @property
    def end(self) -> int:
        return self.offset + self.length


def block_key(seq, index: int, block_size: int) -> tuple:
    """What identifies block `index` of seq for the prefix cache: its tokens (+ the hashes of images it covers)."""
    lo, hi = index * block_size, (index + 1) * block_size
    key = tuple(seq.token_ids[lo:hi])
    if seq.mm_items:
        key += tuple(("image", m.content_hash, m.offset) for m in seq.mm_items if m.offset < hi and m.end > lo)
    return key


def encoder_tokens(seq, start: int, num: int) -> int:
    """Encoder work a chunk [start, start + num) starts: the tokens of each image it touches not encoded yet."""
    return sum(m.length for m in seq.mm_items if m.embeds is None and m.offset < start + num and m.end > start)


def fit_budget(seq, start: int, num: int, budget: int, first: bool) -> int:
    """The chunk size to schedule for seq (0 = none this step) so that its decoder tokens plus the encoder work it
    starts fit `budget`: cut before the first image that does not fit. `first`: nothing else is in the step yet,
    so an image too large for the budget runs anyway (alone) rather than never. A bidirectional image is never
    split: the chunk ends before it, or (first, starting at it) takes all of it even past the budget."""
    if not seq.mm_items:
        return num
    num = _fit_encoder(seq, start, num, budget, first)
    for m in seq.mm_items:
        if m.bidirectional and m.offset < start + num < m.end:
            if m.offset > start:
                return m.offset - start
            return m.end - start if first else 0
    return num


def _fit_encoder(seq, start: int, num: int, budget: int, first: bool) -> int:
    if num + encoder_tokens(seq, start, num) <= budget:
        return num
    # the longest chunk that ends just before an image not encoded yet and fits (text before it, earlier images)
    ends = [m.offset - start for m in seq.mm_items if m.embeds is None and start < m.offset < start + num]
    for cut in reversed(ends):
        if cut + encoder_tokens(seq, start, cut) <= budget:
            return cut
    return num if first else 0


def whole_image_prefix(seq, num_cached: int) -> int:
    """A prefix-cache hit of num_cached tokens, cut back to the start of a bidirectional image it ends inside."""
    for m in seq.mm_items:
        if m.bidirectional and m.offset < num_cached < m.end:
            return m.offset
    return num_cached


def image_spans(seq, start: int, num: int) -> list[tuple[int, int]]:
    """The (first, end) positions of the bidirectional images a chunk [start, start + num) holds (whole, as
    fit_budget schedules them): the attention mask lifts causality inside each (engine/attention_metadata.py)."""
    return [(m.offset, m.end) for m in seq.mm_items if m.bidirectional and m.offset < start + num and m.end > start]
