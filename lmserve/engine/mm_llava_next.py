"""LLaVA-NeXT's side of image preprocessing (engine/mm_inputs.py runs the HF processor for every VLM).

transformers' LlavaNextProcessor cuts each image into its anyres tiles (the base view first) and returns them padded
with zero tiles to the largest count in the prompt (`pixel_values` [images, max tiles, 3, H, W]), with each image's
original (height, width) (`image_sizes`). Each image's placeholder becomes one run of image tokens whose length
depends on that size. One item per image: its tiles, padding included (the model keeps the number its grid needs,
as HF's get_image_features does: model/llava_next.py), and its size."""
from __future__ import annotations

from lmserve.engine.mm_items import MMItem
from lmserve.engine.mm_qwen import image_runs

LLAVA_NEXT_TYPES = ("llava_next",)


def image_token_counts(processor, out, ids: list[int], token_id: int, num_images: int) -> list[int]:
    """The number of image tokens the processor gave each image, in prompt order."""
    replace = getattr(processor, "replace_image_token", None)     # what the processor expanded image i to
    if replace is not None:
        return [replace(out, i).count(processor.image_token) for i in range(num_images)]
    return [length for _, length in image_runs(ids, token_id)]    # older processors: images apart in the text


def llava_next_items(processor, ids: list[int], out, hashes: list[int], token_id: int, error) -> list[MMItem]:
    """The processor's output -> one MMItem per image. error: the exception class for a mismatch."""
    counts = image_token_counts(processor, out, ids, token_id, len(hashes))
    positions = [i for i, t in enumerate(ids) if t == token_id]
    sizes = out["image_sizes"].tolist()
    if len(counts) != len(hashes) or len(sizes) != len(hashes) or sum(counts) != len(positions):
        raise error(f"the processor gave {len(positions)} image tokens in {len(counts)} runs and {len(sizes)} "
                    f"image sizes for {len(hashes)} images")
    items, first = [], 0
    for i, (count, content) in enumerate(zip(counts, hashes)):
        offset = positions[first]
        if count < 1 or positions[first + count - 1] != offset + count - 1:
            raise error("an image's tokens are not contiguous in the processed prompt")
        data = {"pixel_values": out["pixel_values"][i], "image_size": tuple(int(v) for v in sizes[i])}
        items.append(MMItem(offset, count, content, data))
        first += count
    return items
