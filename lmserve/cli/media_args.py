"""api_server flags for images in requests (vLLM's spellings where vLLM has one) -> `MediaConfig`."""
from __future__ import annotations

import argparse
import json
import os


def add_media_args(p: argparse.ArgumentParser) -> None:
    from lmserve.config import MediaConfig
    d = MediaConfig()
    g = p.add_argument_group("images in requests (vision-language models; docs/operations.md)")
    g.add_argument("--limit-mm-per-prompt", default=None,
                   help="most images in one request, as image=N or JSON {\"image\": N} "
                        f"(default {d.limit_images_per_prompt})")
    g.add_argument("--allowed-local-media-path", default=None,
                   help="serve file:// image URLs from under this directory (default: file:// refused)")
    g.add_argument("--no-remote-media", action="store_true", help="refuse http(s) image URLs (data: URIs only)")
    g.add_argument("--media-fetch-timeout", type=float, default=d.fetch_timeout,
                   help="seconds to download one remote image, redirects included")
    g.add_argument("--media-max-redirects", type=int, default=d.max_redirects, help="redirects followed per image")
    g.add_argument("--max-image-bytes", type=int, default=d.max_image_bytes, help="largest encoded image")
    g.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels,
                   help="largest width x height (larger images, decompression bombs included, get 400)")


def parse_limit_mm_per_prompt(value: str | None, default: int) -> int:
    """'image=4', 'image=4,video=0' or '{"image": 4}' -> the image limit."""
    if value is None:
        return default
    text = value.strip()
    try:
        limits = json.loads(text) if text.startswith("{") else {
            k.strip(): v for k, _, v in (item.partition("=") for item in text.split(",") if item.strip())}
        limits = {k: int(v) for k, v in limits.items()}
    except (ValueError, TypeError, AttributeError):
        raise ValueError(f"--limit-mm-per-prompt must be image=N or JSON like {{\"image\": N}}, got {value!r}") \
            from None
    unknown = [k for k, v in limits.items() if k != "image" and v]
    if unknown:
        raise ValueError(f"--limit-mm-per-prompt: only images are supported, not {', '.join(unknown)}")
    return limits.get("image", default)


def build_media_config(args: argparse.Namespace):
    from lmserve.config import MediaConfig
    root = args.allowed_local_media_path
    if root is not None and not os.path.isdir(root):
        raise ValueError(f"--allowed-local-media-path {root!r} is not a directory")
    return MediaConfig(limit_images_per_prompt=parse_limit_mm_per_prompt(args.limit_mm_per_prompt,
                                                                         MediaConfig.limit_images_per_prompt),
                       allowed_local_media_path=os.path.realpath(root) if root else None,
                       allow_remote_media=not args.no_remote_media, fetch_timeout=args.media_fetch_timeout,
                       max_redirects=args.media_max_redirects, max_image_bytes=args.max_image_bytes,
                       max_image_pixels=args.max_image_pixels)
