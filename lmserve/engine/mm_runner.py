"""The runner's side of images: run the vision encoder for the images a step touches (once per image) and hand the
model the embeddings of the image-token rows in the step's batch. A chunk may hold only part of an image's tokens
(chunked prefill, or a prefix-cache hit that ends inside it): it gets the matching slice."""
from __future__ import annotations

import torch

from lmserve.engine.mm_items import MMItem


def mm_slices(seq, start: int, num: int, row: int) -> list[tuple[MMItem, int, int, int]]:
    """The image tokens among positions [start, start + num) of seq placed at batch row `row`:
    (item, first token within the image, count, batch row)."""
    out = []
    for m in seq.mm_items:
        lo, hi = max(m.offset, start), min(m.end, start + num)
        if lo < hi:
            out.append((m, lo - m.offset, hi - lo, row + lo - start))
    return out


def mm_embeddings(model, slices: list, device: torch.device) -> dict:
    """-> the model's extra forward kwargs: {"mm_embeds": (rows, embeddings)}, or {} with no image rows."""
    if not slices:
        return {}
    todo = list({id(m): m for m, *_ in slices if m.embeds is None}.values())
    if todo:
        embeds = model.encode_images([m.data for m in todo])
        for m, e in zip(todo, embeds):
            if e.shape[0] != m.length:
                raise RuntimeError(f"the vision encoder gave {e.shape[0]} embeddings for an image of {m.length} "
                                   "tokens")
            m.embeds = e
    rows = torch.cat([torch.arange(r, r + n) for _, _, n, r in slices]).to(device)
    return {"mm_embeds": (rows, torch.cat([m.embeds[a:a + n] for m, a, n, _ in slices]))}
