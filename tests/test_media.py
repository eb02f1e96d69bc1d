"""Images in requests, with no model: decoding and every bad-image case (server/media.py), data:/file:/http(s) URLs
and their limits (server/media_fetch.py, a local 127.0.0.1 http server), the per-prompt limit and the chat/generate
plumbing (server/mm_input.py), the --limit-mm-per-prompt flag."""
from __future__ import annotations

import asyncio
import base64
import http.server
import io
import os
import struct
import threading
import time
import zlib

import pytest
from PIL import Image

from lmserve.cli.media_args import parse_limit_mm_per_prompt
from lmserve.config import MediaConfig
from lmserve.server.errors import APIError
from lmserve.server.media import decode_image_sync
from lmserve.server.media_fetch import fetch_image_bytes
from lmserve.server.mm_input import (ImageRef, for_template, generate_image_refs, load_images, model_architecture,
                                     place_images)
from lmserve.server.serving_chat import normalize_messages

PARAM = "messages[0].content[1].image_url"


def png(size=(8, 6), color=(255, 0, 0), mode="RGB", fmt="PNG", **save) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, fmt, **save)
    return buf.getvalue()


def data_uri(data: bytes, kind="image/png") -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb's header; the data never decodes)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def fetch(url: str, config: MediaConfig | None = None) -> bytes:
    return asyncio.run(fetch_image_bytes(url, PARAM, config or MediaConfig()))


def refused(fn, *args, match: str = "") -> APIError:
    with pytest.raises(APIError) as info:
        fn(*args)
    err = info.value
    assert err.status == 400 and err.param is not None, (err.status, err.param)
    assert match.lower() in err.message.lower(), err.message
    return err


# ---- decoding -------------------------------------------------------------------------------------------------
def test_decode_rgb_and_modes_become_rgb():
    img = decode_image_sync(png(), PARAM, 1 << 20)
    assert img.mode == "RGB" and img.size == (8, 6) and img.getpixel((0, 0)) == (255, 0, 0)
    cmyk = decode_image_sync(png(mode="CMYK", color=(0, 0, 0, 0), fmt="JPEG"), PARAM, 1 << 20)
    assert cmyk.mode == "RGB" and cmyk.getpixel((0, 0))[0] > 240
    la = decode_image_sync(png(mode="LA", color=(0, 0)), PARAM, 1 << 20)      # fully transparent: over white
    assert la.mode == "RGB" and la.getpixel((0, 0)) == (255, 255, 255)
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 255] * 256)
    buf = io.BytesIO()
    p.save(buf, "PNG")
    assert decode_image_sync(buf.getvalue(), PARAM, 1 << 20).getpixel((0, 0)) == (0, 0, 255)
    i16 = decode_image_sync(png(mode="I;16", color=65535), PARAM, 1 << 20)
    assert i16.mode == "RGB" and i16.getpixel((0, 0))[0] >= 254


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (6, 6), c) for c in ((0, 255, 0), (255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    img = decode_image_sync(buf.getvalue(), PARAM, 1 << 20)
    assert img.mode == "RGB" and img.getpixel((2, 2)) == (0, 255, 0)


def test_bad_images_are_400_naming_the_part():
    err = refused(decode_image_sync, b"hello, not an image", PARAM, 1 << 20, match="not an image")
    assert err.param == PARAM
    refused(decode_image_sync, png((64, 64))[:60], PARAM, 1 << 20, match="")          # truncated
    jpeg = png((256, 256), fmt="JPEG")
    refused(decode_image_sync, jpeg[:len(jpeg) // 2], PARAM, 1 << 26, match="truncated")
    svg = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'
    refused(decode_image_sync, svg, PARAM, 1 << 20, match="SVG")
    # a 20k x 20k header: refused from the header, long before 1.2 GB of pixels
    t0 = time.monotonic()
    refused(decode_image_sync, png_header_only(20_000, 20_000), PARAM, 1 << 26, match="pixels")
    assert time.monotonic() - t0 < 5
    refused(decode_image_sync, png((100, 100)), PARAM, 5000, match="--max-image-pixels")
    refused(decode_image_sync, png_header_only(0, 10), PARAM, 1 << 20)


# ---- data: URIs -----------------------------------------------------------------------------------------------
def test_data_uris():
    assert fetch(data_uri(png())) == png()
    assert fetch(data_uri(png()).replace("base64,", "base64,\n")) == png()      # line-wrapped base64
    refused(fetch, "data:image/png;base64,@@@@", match="base64")
    refused(fetch, "data:text/plain;base64,aGVsbG8=", match="not an image")
    refused(fetch, data_uri(b"<svg/>", "image/svg+xml"), match="SVG")
    refused(fetch, "data:image/png;base64", match="','")
    refused(fetch, "data:image/png;base64,", match="no data")
    small = MediaConfig(max_image_bytes=100)
    refused(fetch, data_uri(png((64, 64), color=(1, 2, 3)) + os.urandom(200)), small, match="--max-image-bytes")
    refused(fetch, "ftp://example.com/a.png", match="data: URI")
    refused(fetch, "", match="non-empty")


# ---- file:// --------------------------------------------------------------------------------------------------
def test_file_urls_only_under_the_allowed_path(tmp_path):
    root = tmp_path / "media"
    root.mkdir()
    (root / "a.png").write_bytes(png())
    (tmp_path / "secret.png").write_bytes(png(color=(0, 0, 0)))
    os.symlink(tmp_path / "secret.png", root / "link.png")
    os.symlink(tmp_path, root / "up")
    allowed = MediaConfig(allowed_local_media_path=str(root))
    assert fetch(f"file://{root}/a.png", allowed) == png()
    refused(fetch, f"file://{root}/a.png", match="--allowed-local-media-path")           # not configured
    refused(fetch, f"file://{root}/../secret.png", allowed, match="outside")
    refused(fetch, f"file://{root}/%2e%2e/secret.png", allowed, match="outside")
    refused(fetch, f"file://{root}/link.png", allowed, match="outside")                 # symlink escape
    refused(fetch, f"file://{root}/up/secret.png", allowed, match="outside")
    refused(fetch, f"file://{root}/missing.png", allowed, match="cannot be read")
    refused(fetch, f"file://{root}", allowed, match="")                                  # a directory
    refused(fetch, f"file://otherhost{root}/a.png", allowed, match="local path")
    big = MediaConfig(allowed_local_media_path=str(root), max_image_bytes=10)
    refused(fetch, f"file://{root}/a.png", big, match="--max-image-bytes")


# ---- http(s) against a local server ---------------------------------------------------------------------------
class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes, kind: str | None, length: bool = True):
        self.send_response(status)
        if kind:
            self.send_header("Content-Type", kind)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        path = self.path
        if path == "/ok.png":
            self._send(200, png(), "image/png")
        elif path == "/page":
            self._send(200, b"<html></html>", "text/html; charset=utf-8")
        elif path == "/svg":
            self._send(200, b"<svg/>", "image/svg+xml")
        elif path == "/big":
            self._send(200, os.urandom(5000), "image/png")
        elif path == "/big-no-length":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(os.urandom(5000))
        elif path.startswith("/redirect/"):
            n = int(path.rsplit("/", 1)[1])
            self.send_response(302)
            self.send_header("Location", "/ok.png" if n == 0 else f"/redirect/{n - 1}")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/slow":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            try:
                for _ in range(50):         # drips a byte every 0.1 s: each read is quick, the whole is not
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass
        else:
            self._send(404, b"no", "text/plain")


@pytest.fixture(scope="module")
def media_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_remote_fetch(media_server):
    assert fetch(f"{media_server}/ok.png") == png()
    assert fetch(f"{media_server}/redirect/2") == png()
    refused(fetch, f"{media_server}/redirect/5", match="redirects more than 3")
    refused(fetch, f"{media_server}/page", match="text/html")
    refused(fetch, f"{media_server}/svg", match="SVG")
    refused(fetch, f"{media_server}/missing", match="HTTP 404")
    small = MediaConfig(max_image_bytes=1000)
    refused(fetch, f"{media_server}/big", small, match="--max-image-bytes")
    refused(fetch, f"{media_server}/big-no-length", small, match="--max-image-bytes")
    t0 = time.monotonic()
    refused(fetch, f"{media_server}/slow", MediaConfig(fetch_timeout=0.5), match="within 0.5 s")
    assert time.monotonic() - t0 < 3
    refused(fetch, f"{media_server}/ok.png", MediaConfig(allow_remote_media=False), match="--no-remote-media")


def test_load_images_concurrently_with_limit_and_first_error(media_server):
    refs = [ImageRef(f"image_data[{k}]", u) for k, u in enumerate([data_uri(png()), f"{media_server}/ok.png"])]
    images = asyncio.run(load_images(refs, MediaConfig()))
    assert [im.size for im in images] == [(8, 6), (8, 6)]
    err = refused(lambda: asyncio.run(load_images(refs, MediaConfig(limit_images_per_prompt=1))),
                  match="--limit-mm-per-prompt")
    assert err.code == "too_many_images"
    bad = refs + [ImageRef("image_data[2]", data_uri(b"junk"))]
    err = refused(lambda: asyncio.run(load_images(bad, MediaConfig())))
    assert err.param == "image_data[2]"


# ---- plumbing -------------------------------------------------------------------------------------------------
def test_chat_parts_become_template_items_and_refs():
    refs: list[ImageRef] = []
    url = data_uri(png())
    messages = [{"role": "user", "content": [{"type": "text", "text": "look"},
                                             {"type": "image_url", "image_url": {"url": url, "detail": "low"}},
                                             {"type": "text", "text": "and"},
                                             {"type": "image_url", "image_url": url}]}]
    out = normalize_messages(messages, image_refs=refs)
    assert out[0]["content"] == [{"type": "text", "text": "look"}, {"type": "image"}, {"type": "text", "text": "and"},
                                 {"type": "image"}]
    assert [r.param for r in refs] == [PARAM, "messages[0].content[3].image_url"]
    assert for_template(out, "{{ messages }}", "<image>")[0]["content"] == "look\n<image>\nand\n<image>"
    assert for_template(out, "{% if item['type'] == 'image' %}", "<image>") == out
    with pytest.raises(APIError) as info:       # text-only models: today's 400
        normalize_messages(messages)
    assert info.value.status == 400 and info.value.param == "messages[0].content[1]"
    bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url, "detail": "huge"}}]}]
    with pytest.raises(APIError) as info:
        normalize_messages(bad, image_refs=[])
    assert info.value.param == "messages[0].content[0].image_url.detail"


def test_generate_image_data_shapes_and_placement():
    assert [r.param for r in generate_image_refs("data:x")] == ["image_data"]
    refs = generate_image_refs(["u1", {"url": "u2", "detail": "auto"}])
    assert [(r.param, r.url) for r in refs] == [("image_data[0]", "u1"), ("image_data[1]", "u2")]
    with pytest.raises(APIError):
        generate_image_refs([3])
    assert place_images("Describe it.", 2, "<image>") == "<image>\n<image>\nDescribe it."
    assert place_images("A <IMAGE_TOKEN> B", 1, "<img>") == "A <img> B"
    assert place_images("<image> what?", 1, "<image>") == "<image> what?"


def test_model_architecture_and_limit_flag():
    class TextOnly:
        pass

    class Vision:
        modalities = ("text", "image")
    assert model_architecture(TextOnly())["input_modalities"] == ["text"]
    assert model_architecture(Vision()) == {"modality": "text+image->text", "input_modalities": ["text", "image"],
                                            "output_modalities": ["text"]}
    assert parse_limit_mm_per_prompt(None, 8) == 8
    assert parse_limit_mm_per_prompt("image=3", 8) == 3
    assert parse_limit_mm_per_prompt('{"image": 2, "video": 0}', 8) == 2
    with pytest.raises(ValueError):
        parse_limit_mm_per_prompt("video=2", 8)
    with pytest.raises(ValueError):
        parse_limit_mm_per_prompt("image=many", 8)


def test_responses_and_messages_images_become_chat_parts():
    from lmserve.server.messages_input import _messages
    from lmserve.server.protocol.anthropic import MessagesRequest
    from lmserve.server.responses_input import input_messages
    url = data_uri(png())
    msgs = input_messages([{"role": "user", "content": [{"type": "input_text", "text": "what?"},
                                                         {"type": "input_image", "image_url": url, "detail": "auto"}]}])
    refs: list[ImageRef] = []
    out = normalize_messages(msgs, image_refs=refs)
    assert out[0]["content"] == [{"type": "text", "text": "what?"}, {"type": "image"}]
    assert [(r.param, r.url) for r in refs] == [("input[0].content[1].image_url", url)]
    with pytest.raises(APIError) as info:       # a text-only model names the Responses part
        normalize_messages(msgs)
    assert info.value.param == "input[0].content[1]"

    b64 = base64.b64encode(png()).decode()
    req = MessagesRequest.model_validate({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64}},
        {"type": "text", "text": "describe"}]}]})
    refs = []
    out = normalize_messages(_messages(req), image_refs=refs)
    assert out[0]["content"] == [{"type": "image"}, {"type": "text", "text": "describe"}]
    assert [(r.param, r.url) for r in refs] == [("messages[0].content[0].source", url)]
