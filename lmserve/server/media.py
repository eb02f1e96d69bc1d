"""Image bytes -> a decoded, validated RGB `PIL.Image.Image` (what the engine takes), or a 400 naming the part.

Decoding runs in a worker thread (`decode_image`), so a large image never stalls the event loop. Every way an
image can be bad ends as an `APIError(400)`: not an image, SVG, truncated data, more pixels than
--max-image-pixels (checked from the header, before any pixel is decoded: a 20k x 20k PNG of a few KB must not
become 1.2 GB of RGB), an animation (its first frame is used), or a mode the models do not take (CMYK, P, LA, I;16
...: converted to RGB, transparency over white).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import io
import urllib.parse
import warnings

from PIL import Image, UnidentifiedImageError

from lmserve.config import MediaConfig
from lmserve.server.errors import APIError

_SVG_TYPES = ("image/svg+xml", "image/svg")


def bad_image(param: str, why: str) -> APIError:
    return APIError(400, f"{param}: {why}", param=param, code="invalid_image")


def parse_data_uri(url: str, param: str, max_bytes: int) -> bytes:
    """`data:image/png;base64,...` -> the bytes. Only image media types; base64 or percent-encoded."""
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise bad_image(param, "a data: URI needs a ',' between its header and its data")
    fields = [f.strip().lower() for f in header.split(";")]
    media_type = fields[0] or "text/plain"
    if media_type in _SVG_TYPES:
        raise bad_image(param, "SVG images are not supported (send a raster image: PNG, JPEG, WebP, GIF ...)")
    if not media_type.startswith("image/"):
        raise bad_image(param, f"a data: URI of type {media_type!r} is not an image")
    if "base64" in fields[1:]:
        # NOTE: checked before decoding: base64 is 4 characters per 3 bytes
        if len(payload) // 4 * 3 > max_bytes + 3:
            raise too_large(param, max_bytes)
        try:
            data = base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError):
            raise bad_image(param, "the data: URI is not valid base64") from None
    else:
        data = urllib.parse.unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise too_large(param, max_bytes)
    if not data:
        raise bad_image(param, "the data: URI holds no data")
    return data


def too_large(param: str, max_bytes: int) -> APIError:
    return bad_image(param, f"the image is larger than {max_bytes} bytes (--max-image-bytes)")


def _to_rgb(img: Image.Image) -> Image.Image:
    has_alpha = img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # NOTE: Pillow's "RGB" conversion clips 16-bit samples to 255; scale them to 8 bits instead
        img = img.point(lambda v: v / 256).convert("L") if img.mode != "F" else img.convert("L")
    return img.convert("RGB")


def decode_image_sync(data: bytes, param: str, max_pixels: int) -> Image.Image:
    """The first frame of `data` as an RGB image; APIError(400) for anything that is not a usable raster image."""
    head = data[:512].lstrip().lower()
    if head.startswith(b"<?xml") or head.startswith(b"<svg") or b"<svg" in head:
        raise bad_image(param, "SVG images are not supported (send a raster image: PNG, JPEG, WebP, GIF ...)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise bad_image(param, f"the image has more than {max_pixels} pixels (--max-image-pixels)") from None
        except UnidentifiedImageError:
            raise bad_image(param, "the data is not an image Pillow can read (PNG, JPEG, WebP, GIF, BMP ...)") \
                from None
        except Exception as exc:    # noqa: BLE001 - a broken header can raise almost anything
            raise bad_image(param, f"the image cannot be read: {exc}") from None
        # NOTE: the header alone gives the size: refuse before decoding a single pixel
        if img.width * img.height > max_pixels:
            raise bad_image(param, f"the image is {img.width} x {img.height} pixels, more than {max_pixels} "
                                   "(--max-image-pixels)")
        if img.width < 1 or img.height < 1:
            raise bad_image(param, "the image is empty (0 pixels)")
        try:
            img.seek(0)             # animations: the first frame
            img.load()
            return _to_rgb(img)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise bad_image(param, f"the image has more than {max_pixels} pixels (--max-image-pixels)") from None
        except Exception as exc:    # noqa: BLE001 - truncated data, bad codec state, unsupported modes
            raise bad_image(param, f"the image cannot be decoded (truncated or corrupt?): {exc}") from None


async def decode_image(data: bytes, param: str, config: MediaConfig) -> Image.Image:
    return await asyncio.to_thread(decode_image_sync, data, param, config.max_image_pixels)
