"""The web page's image attachments in Chromium (file picker, paste, drag and drop), against a small fake server
that serves the real page and checks what arrives: each image a data: URI that decodes (server/media.py), the
streamed answer shown. The same page against a real vision model is in tests/test_api_vision.py."""
from __future__ import annotations

import asyncio
import base64
import io
import json

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from PIL import Image
from test_proxy_fakes import ServerThread
from test_web import browser, chat_bodies, open_page, wait_reply_done  # noqa: F401 - the browser fixture

from lmserve.server.media import decode_image_sync
from lmserve.server.media_fetch import fetch_image_bytes
from lmserve.config import MediaConfig
from lmserve.web import mount_web

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


def png_bytes(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 10), color).save(buf, "PNG")
    return buf.getvalue()


def fake_vision_app() -> FastAPI:
    app = FastAPI()
    app.state.seen = []

    @app.get("/health")
    async def health():
        return {}

    @app.get("/v1/models")
    async def models():
        card = {"object": "model", "created": 0, "owned_by": "fake"}
        return {"object": "list", "data": [
            {**card, "id": "vision-model", "architecture": {"input_modalities": ["text", "image"]}},
            {**card, "id": "text-model", "architecture": {"input_modalities": ["text"]}}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        colors = []
        for part in body["messages"][-1]["content"]:
            if isinstance(part, dict) and part["type"] == "image_url":
                data = await fetch_image_bytes(part["image_url"]["url"], "x", MediaConfig(allow_remote_media=False))
                colors.append(decode_image_sync(data, "x", 1 << 20).getpixel((0, 0)))
        app.state.seen.append(colors)

        async def events():
            for text in ("saw ", f"{len(colors)} ", "images"):
                chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": body["model"],
                         "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
                yield f"data: {json.dumps(chunk)}\n\n"
                await asyncio.sleep(0.05)
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    mount_web(app)
    return app


@pytest.fixture(scope="module")
def fake_server():
    server = ServerThread(fake_vision_app()).start()
    yield server
    server.stop(force=True)


def test_attach_by_picker_paste_and_drop_then_send(browser, fake_server):  # noqa: F811
    page = open_page(browser, fake_server.url)
    bodies = chat_bodies(page)
    page.select_option("#model", "vision-model")
    page.wait_for_selector("#attach", state="visible")

    page.set_input_files("#attach-input", files=[{"name": "red.png", "mimeType": "image/png",
                                                   "buffer": png_bytes((255, 0, 0))}])
    page.wait_for_selector("#attachments .attachment img")
    for target, event in (("#prompt", "paste"), (".chat", "drop")):
        color = [0, 255, 0] if event == "paste" else [0, 0, 255]
        page.evaluate("""async ([target, event, b64]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], 'x.png', { type: 'image/png' }));
            const init = { bubbles: true, cancelable: true };
            const e = event === 'paste' ? new ClipboardEvent('paste', { ...init, clipboardData: dt })
                                        : new DragEvent('drop', { ...init, dataTransfer: dt });
            document.querySelector(target).dispatchEvent(e);
        }""", [target, event, base64.b64encode(png_bytes(tuple(color))).decode()])
    page.wait_for_function("document.querySelectorAll('#attachments .attachment').length === 3")
    # one removed again, one added back: the tray is what gets sent
    page.click("#attachments .attachment:nth-child(2) button")
    page.set_input_files("#attach-input", files=[{"name": "g.png", "mimeType": "image/png",
                                                   "buffer": png_bytes((0, 255, 0))}])
    page.wait_for_function("document.querySelectorAll('#attachments .attachment').length === 3")

    page.fill("#prompt", "what is this?")
    page.press("#prompt", "Enter")
    wait_reply_done(page, 60)
    assert page.locator(".msg.assistant .content").last.inner_text().strip() == "saw 3 images"
    assert page.locator(".msg.user .images img").count() == 3
    assert page.locator("#attachments").is_hidden()
    content = bodies[-1]["messages"][-1]["content"]
    assert [p["type"] for p in content] == ["image_url"] * 3 + ["text"] and content[-1]["text"] == "what is this?"
    assert all(p["image_url"]["url"].startswith("data:image/png;base64,") for p in content[:3])
    assert fake_server.app.state.seen[-1] == [(255, 0, 0), (0, 0, 255), (0, 255, 0)]

    page.select_option("#model", "text-model")          # a text-only model: no attaching
    page.wait_for_selector("#attach", state="hidden")
    assert not page.errors, page.errors
    page.context.close()
