"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL's side of image preprocessing (engine/mm_inputs.py runs the HF processor for
every VLM).

- The processor: transformers' Qwen2-VL processor (dynamic resolution: the image is resized so both sides are
  multiples of 28 and its area lies within min/max pixels, then cut into 2x14x14x3 patches; one <|image_pad|> per
  2x2 patches; Qwen3-VL's: 16-pixel patches, so multiples of 32). Its AutoProcessor also builds the video
  processor, which needs torchvision even for images; without torchvision the same processor class is built with
  no video processor (images work, videos are not served).
- The items: the processor returns every image's patches back to back (`pixel_values` [patches, 1176]) and each
  image's grid (`image_grid_thw`, in patches); each image becomes one item with its own patches, its grid and its
  merged grid (`llm_grid`, which M-RoPE needs: engine/mrope.py)."""
from __future__ import annotations

import logging

from lmserve.engine.mm_items import MMItem

logger = logging.getLogger(__name__)

QWEN_VL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
# what one image takes in a raw prompt: Qwen's chat template writes the same for an image item
QWEN_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


def load_qwen_processor(model_path: str, model_type: str):
    import transformers
    try:
        return transformers.AutoProcessor.from_pretrained(model_path)
    except ImportError as e:      # torchvision missing: the video processor cannot be built
        logger.info("Qwen-VL processor without its video processor (%s)", str(e).strip().splitlines()[0])
    base = {"qwen2_vl": transformers.Qwen2VLProcessor, "qwen3_vl": transformers.Qwen3VLProcessor}.get(
        model_type, transformers.Qwen2_5_VLProcessor)

    class ImageOnlyProcessor(base):
        def check_argument_for_proper_class(self, name, arg):
            if name != "video_processor":
                return super().check_argument_for_proper_class(name, arg)

    return ImageOnlyProcessor(image_processor=transformers.AutoImageProcessor.from_pretrained(model_path),
                              tokenizer=transformers.AutoTokenizer.from_pretrained(model_path),
                              video_processor=None)


def image_runs(ids: list[int], token_id: int) -> list[tuple[int, int]]:
    """(offset, length) of each contiguous run of token_id."""
    runs: list[tuple[int, int]] = []
    for i, t in enumerate(ids):
        if t != token_id:
            continue
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


def qwen_items(ids: list[int], out, hashes: list[int], token_id: int, merge: int, error) -> list[MMItem]:
    """The processor's output -> one MMItem per image. error: the exception class for a mismatch."""
    grids = [tuple(int(v) for v in g) for g in out["image_grid_thw"].tolist()]
    runs = image_runs(ids, token_id)
    if len(runs) != len(hashes) or len(grids) != len(hashes):
        raise error(f"the processor gave {len(runs)} image token runs and {len(grids)} image grids for "
                    f"{len(hashes)} images")
    pixels, first, items = out["pixel_values"], 0, []
    for (offset, length), (t, h, w), content in zip(runs, grids, hashes):
        if t * h * w != length * merge * merge:
            raise error(f"an image of {length} tokens has {t}x{h}x{w} patches")
        data = {"pixel_values": pixels[first:first + t * h * w], "image_grid_thw": (t, h, w),
                "llm_grid": (t, h // merge, w // merge)}
        items.append(MMItem(offset, length, content, data))
        first += t * h * w
    return items
