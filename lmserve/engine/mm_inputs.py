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
from lmserve.outputs import InvalidRequestError

logger = logging.getLogger(__name__)


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
        self.processor = AutoProcessor.from_pretrained(model_path)
        tok = self.processor.tokenizer
        self.image_token = getattr(self.processor, "image_token", None) or "<image>"
        self.image_token_id = tok.convert_tokens_to_ids(self.image_token)
        # the string one image takes in a raw prompt (/generate; chat templates that cannot render image items)
        self.image_placeholder = self.image_token

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
        out = self.processor(text=prompt, images=images, return_tensors="pt")
        ids = out["input_ids"][0].tolist()
        positions = [i for i, t in enumerate(ids) if t == self.image_token_id]
        per_image = len(positions) // len(images)
        if per_image * len(images) != len(positions):
            raise MMInputError(f"the processor gave {len(positions)} image tokens for {len(images)} images")
        items = []
        for i, image in enumerate(images):
            offset = positions[i * per_image]
            if positions[(i + 1) * per_image - 1] != offset + per_image - 1:
                raise MMInputError("an image's tokens are not contiguous in the processed prompt")
            data = {"pixel_values": out["pixel_values"][i:i + 1]}
            items.append(MMItem(offset, per_image, image_hash(image), data))
        return MMPrompt(ids, items)


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
