"""Images in requests -> the engine's `images` list (decoded PIL images, in prompt order) and the prompt that
places them: chat `image_url` parts, /generate's `image_data` (LMDeploy's shape).

Chat templates that know image items get `{"type": "image"}` content items (the transformers convention) and emit
the model's placeholder once per image; for a template that does not, the text gets the engine's
`image_placeholder` where each image was. A text-only model (engine.modalities without "image") refuses image
parts with the same 400 as before vision models existed.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from collections.abc import AsyncIterator
from typing import Any

from lmserve.config import MediaConfig
from lmserve.server.errors import APIError, not_supported
from lmserve.server.media import bad_image, decode_image
from lmserve.server.media_fetch import fetch_image_bytes

IMAGE_PART_TYPES = ("image_url",)
LMDEPLOY_IMAGE_TOKEN = "<IMAGE_TOKEN>"     # LMDeploy's marker for "an image goes here" in a raw prompt
_DETAILS = ("auto", "low", "high")


@dataclass(frozen=True)
class ImageRef:
    param: str      # where the image is in the request, for errors: messages[0].content[1].image_url
    url: str


def takes_images(engine) -> bool:
    return "image" in tuple(getattr(engine, "modalities", ("text",)))


def image_placeholder(engine) -> str:
    return getattr(engine, "image_placeholder", None) or "<image>"


def image_ref(part: dict[str, Any], param: str) -> ImageRef:
    """An OpenAI `image_url` part (the URL as a string or {"url", "detail"}) -> ImageRef."""
    value = part.get("image_url")
    where = f"{part['_where']}.{part['_field']}" if part.get("_where") else f"{param}.image_url"
    if isinstance(value, dict):
        detail = value.get("detail")
        if detail is not None and detail not in _DETAILS:
            raise APIError(400, f"{where}.detail must be one of {', '.join(_DETAILS)}, got {detail!r}",
                           param=f"{where}.detail")
        value = value.get("url")
    if not isinstance(value, str) or not value:
        raise APIError(400, f"{where} needs a url (a data: URI or an http(s) URL)", param=where)
    return ImageRef(where, value)


def chat_image_part(url: Any, detail: Any, where: str, field: str) -> dict[str, Any]:
    """An image from another API's request (Responses input_image, Anthropic image block) as a chat image_url
    part; `_where` (the part) and `_field` (its URL's field) keep the original names for the chat path's errors."""
    return {"type": "image_url", "image_url": {"url": url, "detail": detail}, "_where": where, "_field": field}


async def load_images(refs: list[ImageRef], config: MediaConfig) -> list:
    """Fetch and decode all images concurrently; the first bad one fails the request with its 400."""
    if len(refs) > config.limit_images_per_prompt:
        raise APIError(400, f"the request has {len(refs)} images, more than the {config.limit_images_per_prompt} "
                            f"allowed per prompt (--limit-mm-per-prompt image=N)", param=refs[-1].param,
                       code="too_many_images")

    async def one(ref: ImageRef):
        return await decode_image(await fetch_image_bytes(ref.url, ref.param, config), ref.param, config)

    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(one(ref)) for ref in refs]
    except BaseExceptionGroup as group:
        first = group.exceptions[0]
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None
    return [t.result() for t in tasks]


def template_renders_images(template: str | None) -> bool:
    # NOTE: HF vision templates test `content['type'] == 'image'` (or 'image' in content): a template that never
    # mentions images would print the items' repr instead
    return bool(template) and "image" in template


def for_template(messages: list[dict[str, Any]], template: str | None, placeholder: str) -> list[dict[str, Any]]:
    """Messages whose content is a list of text/image items -> as the template can render them."""
    if template_renders_images(template):
        return messages
    out = []
    for msg in messages:
        if isinstance(msg.get("content"), list):
            pieces = [placeholder if item["type"] == "image" else item["text"] for item in msg["content"]]
            msg = dict(msg, content="\n".join(pieces))
        out.append(msg)
    return out


def generate_image_refs(image_data: Any) -> list[ImageRef]:
    """/generate `image_data`: a URL string, an {"url", ...} object, or a list of them (LMDeploy's shape)."""
    items = image_data if isinstance(image_data, list) else [image_data]
    refs = []
    for k, item in enumerate(items):
        param = f"image_data[{k}]" if isinstance(image_data, list) else "image_data"
        if isinstance(item, dict):
            ref = image_ref({"image_url": item}, param)
            refs.append(ImageRef(param, ref.url))
        elif isinstance(item, str) and item:
            refs.append(ImageRef(param, item))
        else:
            raise bad_image(param, "an image is a URL string or an object with a url")
    return refs


def place_images(prompt: str, num_images: int, placeholder: str) -> str:
    """A raw prompt with images: LMDeploy's <IMAGE_TOKEN> markers become the model's placeholder; a prompt with
    no placeholder at all gets one per image in front (LMDeploy puts images before the text too)."""
    prompt = prompt.replace(LMDEPLOY_IMAGE_TOKEN, placeholder)
    if placeholder not in prompt:
        prompt = "".join(placeholder + "\n" for _ in range(num_images)) + prompt
    return prompt


async def generate_images(engine, config: MediaConfig, image_data: Any, prompt: str | None,
                          use_session: bool) -> tuple[str | None, list | None]:
    """/generate: (the prompt with the images placed, the decoded images); (prompt, None) without images."""
    if image_data is None or image_data == []:
        return prompt, None
    if not takes_images(engine):
        raise not_supported("image_data", "image_data (the model takes text only)")
    if use_session:
        raise not_supported("session_id", "session_id with image_data")
    images = await load_images(generate_image_refs(image_data), config)
    if prompt is not None:
        prompt = place_images(prompt, len(images), image_placeholder(engine))
    return prompt, images


def model_architecture(engine) -> dict[str, Any]:
    """/v1/models: which modalities the model takes, in OpenRouter's `architecture` shape."""
    inputs = ["text", "image"] if takes_images(engine) else ["text"]
    return {"modality": "+".join(inputs) + "->text", "input_modalities": inputs, "output_modalities": ["text"]}


def image_max_tokens(state, requested: int | None, num_text_tokens: int, images: list | None) -> int | None:
    """The output budget. Only the engine knows how many tokens the images take, so an image request that asks for
    no max_tokens gets None (up to the session length, the engine's own bound) instead of a clip to the room the
    text alone leaves."""
    if images and requested is None:
        return None
    return state.clip_max_tokens(requested, num_text_tokens)


async def with_prompt_count(stream: AsyncIterator) -> tuple[int, AsyncIterator]:
    """(the engine's prompt length, images included, from the first output; the same stream, first output kept)."""
    first = await stream.__anext__()

    async def again():
        try:
            yield first
            async for out in stream:
                yield out
        finally:
            await stream.aclose()
    return len(first.prompt_token_ids), again()
