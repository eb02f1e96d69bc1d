"""An image URL -> its bytes: `data:` URIs, `file://` paths under --allowed-local-media-path, and http(s) URLs
(unless --no-remote-media) fetched with a size limit, a timeout over the whole download, a content-type check and
a bounded number of redirects. Every failure is a 400 naming the part (server/media.py `bad_image`)."""
from __future__ import annotations

import asyncio
import os
import urllib.parse

import httpx

from lmserve.config import MediaConfig
from lmserve.server.media import bad_image, parse_data_uri, too_large

_CHUNK = 1 << 16


async def fetch_image_bytes(url: str, param: str, config: MediaConfig) -> bytes:
    if not isinstance(url, str) or not url.strip():
        raise bad_image(param, "the image URL must be a non-empty string")
    url = url.strip()
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return parse_data_uri(url, param, config.max_image_bytes)
    if scheme == "file":
        return await asyncio.to_thread(_read_local, url, param, config)
    if scheme in ("http", "https"):
        if not config.allow_remote_media:
            raise bad_image(param, "this server does not fetch remote images (--no-remote-media); send a data: URI")
        return await _fetch_remote(url, param, config)
    raise bad_image(param, "the image URL must be a data: URI, an http(s) URL or (where allowed) a file:// URL")


def _read_local(url: str, param: str, config: MediaConfig) -> bytes:
    root = config.allowed_local_media_path
    if not root:
        raise bad_image(param, "file:// URLs are refused unless the server has --allowed-local-media-path")
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise bad_image(param, "a file:// URL must name a local path (file:///path)")
    # NOTE: realpath resolves '..' and every symlink, so the check below is on where the file really is
    path = os.path.realpath(urllib.parse.unquote(parsed.path))
    base = os.path.realpath(root)
    if os.path.commonpath([path, base]) != base:
        raise bad_image(param, "the file is outside --allowed-local-media-path")
    try:
        with open(path, "rb") as f:
            if not os.path.isfile(path):
                raise bad_image(param, "the file:// URL does not name a regular file")
            data = f.read(config.max_image_bytes + 1)
    except OSError as exc:
        raise bad_image(param, f"the file cannot be read: {exc.strerror or exc}") from None
    if len(data) > config.max_image_bytes:
        raise too_large(param, config.max_image_bytes)
    return data


async def _fetch_remote(url: str, param: str, config: MediaConfig) -> bytes:
    limit = config.max_image_bytes
    try:
        # NOTE: one deadline over connect, redirects and body: a server that drips bytes cannot hold the request
        async with asyncio.timeout(config.fetch_timeout), httpx.AsyncClient(
                follow_redirects=True, max_redirects=config.max_redirects, trust_env=False,
                timeout=config.fetch_timeout) as client, client.stream("GET", url) as r:
            if r.status_code != 200:
                raise bad_image(param, f"fetching the image answered HTTP {r.status_code}")
            kind = r.headers.get("content-type", "").split(";")[0].strip().lower()
            if kind in ("image/svg+xml", "image/svg"):
                raise bad_image(param, "SVG images are not supported (send a raster image)")
            if not kind.startswith("image/"):
                raise bad_image(param, f"the URL's content-type is {kind or 'missing'!r}, not an image")
            length = r.headers.get("content-length", "")
            if length.isdigit() and int(length) > limit:
                raise too_large(param, limit)
            chunks, size = [], 0
            async for chunk in r.aiter_bytes(_CHUNK):
                size += len(chunk)
                if size > limit:
                    raise too_large(param, limit)
                chunks.append(chunk)
            return b"".join(chunks)
    except TimeoutError:
        raise bad_image(param, f"the image was not fetched within {config.fetch_timeout:g} s (--media-fetch-timeout)") \
            from None
    except httpx.TooManyRedirects:
        raise bad_image(param, f"the image URL redirects more than {config.max_redirects} times") from None
    except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:
        raise bad_image(param, f"the image could not be fetched: {type(exc).__name__}: {exc}") from None
