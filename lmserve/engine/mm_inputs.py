"""Image preprocessing for vision-language models: the model's own Hugging Face processor turns (rendered prompt,
images) into token ids with each image placeholder expanded to the model's image tokens, and per-image encoder
inputs. Using the HF processor (not a re-implementation) keeps resizing, normalisation, tiling and the token
counts identical to transformers'.

The contract with the server: images arrive decoded and validated (PIL RGB, in prompt order); the prompt holds
`image_placeholder` once per image (the chat template writes it for `{"type": "image"}` content items). A count
mismatch is a ValueError naming it, which the server answers with a 400."""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

from lmserve.engine.mm_items import MMItem
from lmserve.engine.mm_llava_next import LLAVA_NEXT_TYPES, llava_next_items
from lmserve.engine.mm_qwen import QWEN_PLACEHOLDER, QWEN_VL_TYPES, load_qwen_processor, qwen_items
from lmserve.outputs import InvalidRequestError

logger = logging.getLogger(__name__)
# models whose decoder attends both ways inside each image's tokens (engine/mm_items.py keeps those images whole)
BIDIRECTIONAL_TYPES = ("gemma3",)


class MMInputError(InvalidRequestError):
    """Images that do not fit the prompt (the server's 400). `param` names the request field."""

    def __init__(self, message: str, param: str = "messages"):
        super().__init__(message, param=param, code="invalid_images")


@dataclass
class MMPrompt:
    """A prompt with its images processed: what LLMEngine.add_request takes as `images` once preprocessed."""
    token_ids: list[int]
    items: list[MMItem]


def image_hash(image) -> int:
    h = hashlib.sha256(f"{image.mode}|{image.size}".encode())
    h.update(image.tobytes())
    return int.from_bytes(h.digest()[:8], "little")


class ImageProcessor:
    """One model's HF processor, wrapped to the engine's contract."""

    def __init__(self, model_path: str, arch):
        from transformers import AutoProcessor
        self.arch = arch
        self.kind = arch.vision.get("model_type")
        self.qwen = self.kind in QWEN_VL_TYPES
        self.processor = load_qwen_processor(model_path, self.kind) if self.qwen else \
            AutoProcessor.from_pretrained(model_path)
        tok = self.processor.tokenizer
        self.image_token = getattr(self.processor, "image_token", None) or "<image>"
        self.image_token_id = tok.convert_tokens_to_ids(self.image_token)
        self.global_token_id = getattr(self.processor, "global_image_token_id", None)
        # the string one image takes in a raw prompt (/generate; chat templates that cannot render image items)
        self.image_placeholder = QWEN_PLACEHOLDER if self.qwen else self.image_token
        self.bidirectional = self.kind in BIDIRECTIONAL_TYPES
        self.extra_kwargs = {}
        if self.bidirectional:    # Gemma 3: <start_of_image> in the prompt becomes boi + soft tokens + eoi
            self.image_placeholder = self.processor.boi_token
            self.image_token = tok.image_token
            self.image_token_id = tok.convert_tokens_to_ids(self.image_token)
            self.extra_kwargs = {"do_pan_and_scan": False}   # NOTE: crops would be extra images; not supported

    def process(self, prompt: str | list[int], images: list) -> MMPrompt | None:
        if not isinstance(prompt, str):
            if not images:
                return None
            raise MMInputError("images need a text prompt (token ids cannot carry image placeholders)", "prompt")
        found = prompt.count(self.image_placeholder)
        if found != len(images):
            raise MMInputError(f"the prompt has {found} image placeholder(s) ({self.image_placeholder!r}) but "
                               f"{len(images)} image(s) were given")
        if not images:
            return None     # a text-only request: tokenized as usual
        # NOTE: a chat template writes BOS itself; adding it again would double it (the engine's encode_chat rule)
        bos = self.processor.tokenizer.bos_token
        out = self.processor(text=prompt, images=images, return_tensors="pt",
                             add_special_tokens=not (bos and prompt.startswith(bos)), **self.extra_kwargs)
        ids = out["input_ids"][0].tolist()
        if self.qwen:
            merge = self.processor.image_processor.merge_size
            return MMPrompt(ids, qwen_items(ids, out, [image_hash(im) for im in images], self.image_token_id,
                                            merge, MMInputError))
        if self.kind in LLAVA_NEXT_TYPES:     # one item per image: its anyres tiles and size
            return MMPrompt(ids, llava_next_items(self.processor, ids, out, [image_hash(im) for im in images],
                                                  self.image_token_id, MMInputError))
        positions = [i for i, t in enumerate(ids) if t == self.image_token_id]
        pixels, masks = out["pixel_values"], out.get("pixel_attention_mask")
        if pixels.dim() == 5:       # [prompts, tiles, 3, H, W]: one prompt here
            pixels, masks = pixels[0], None if masks is None else masks[0]
        num_tiles = pixels.shape[0]
        per_tile = len(positions) // num_tiles
        if per_tile * num_tiles != len(positions):
            raise MMInputError(f"the processor gave {len(positions)} image tokens for {num_tiles} image tiles")
        # each tile (a whole image for LLaVA; a crop or the global view for Idefics3) is one run of image tokens
        hashes = [image_hash(im) for im in images]
        image_of = self._tile_images(ids, positions[::per_tile], len(images))
        items = []
        for k in range(num_tiles):
            offset = positions[k * per_tile]
            if positions[(k + 1) * per_tile - 1] != offset + per_tile - 1:
                raise MMInputError("an image tile's tokens are not contiguous in the processed prompt")
            data = {"pixel_values": pixels[k:k + 1]}
            if masks is not None:
                data["pixel_attention_mask"] = masks[k:k + 1]
            i = image_of[k]
            items.append(MMItem(offset, per_tile, hash((hashes[i], k - image_of.index(i))), data,
                                bidirectional=self.bidirectional))
        return MMPrompt(ids, items)

    def _tile_images(self, ids: list[int], starts: list[int], num_images: int) -> list[int]:
        """The image each tile belongs to. Idefics3 ends each image with its global view (after `<global-img>`)."""
        if self.global_token_id is None:
            if len(starts) != num_images:
                raise MMInputError(f"the processor gave {len(starts)} image tiles for {num_images} images")
            return list(range(num_images))
        image, out = 0, []
        for s in starts:
            out.append(image)
            image += s > 0 and ids[s - 1] == self.global_token_id
        if image != num_images:
            raise MMInputError(f"the processor gave {image} global image views for {num_images} images")
        return out


def process_images(processor: ImageProcessor | None, prompt: str | list[int], images: list | None) -> MMPrompt | None:
    """Expand the prompt's image placeholders and preprocess the images. None: no images (the prompt is tokenized
    as usual). Raises MMInputError (a ValueError, the server's 400) on a mismatch."""
    if processor is None:
        if images:
            raise MMInputError("this model takes text only; it does not accept images")
        return None
    return processor.process(prompt, images or [])


def load_image_processor(model_path: str, arch) -> ImageProcessor | None:
    """The processor of a vision-language checkpoint; None for a text model."""
    if getattr(arch, "vision", None) is None:
        return None
    return ImageProcessor(model_path, arch)
