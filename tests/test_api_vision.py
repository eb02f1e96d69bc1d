"""Images end to end on a real api_server with a tiny random LLaVA (tests/vlm_builders.py): the openai SDK with
data: URIs, LMDeploy's /generate with image_data, /v1/responses and /v1/messages images, file:// and http(s) URLs,
every bad-image case as a 400 naming the part (and the server answering the next request), /v1/models modalities,
the web page attaching an image in Chromium; a text-only model keeps its 400."""
from __future__ import annotations

import base64
import io

import httpx
import openai
import pytest
from conftest import API_SERVER_ARGS, start_api_server
from PIL import Image
from test_media import media_server, png, png_header_only  # noqa: F401 - the 127.0.0.1 image server fixture

pytestmark = pytest.mark.timeout(600)
MAX_IMAGES = 3


def uri(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def gif_animated() -> bytes:
    frames = [Image.new("RGB", (20, 20), c) for c in ((0, 255, 0), (255, 0, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50)
    return buf.getvalue()


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    (root / "red.png").write_bytes(png((30, 30), (255, 0, 0)))
    (root.parent / "outside.png").write_bytes(png())
    return root


@pytest.fixture(scope="module")
def vision_server(tmp_path_factory, media_dir, smollm2_path):
    vlm_builders = pytest.importorskip("vlm_builders", reason="needs the vision models (tests/vlm_builders.py)")
    path = vlm_builders.make_random_vlm("llava", str(tmp_path_factory.mktemp("llava")))
    server = start_api_server(tmp_path_factory.mktemp("vision_server"), path, *API_SERVER_ARGS,
                              "--allowed-local-media-path", str(media_dir),
                              "--limit-mm-per-prompt", f"image={MAX_IMAGES}", "--max-image-pixels", str(1 << 22),
                              "--kernels", "torch")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sdk(vision_server):
    return openai.OpenAI(base_url=f"{vision_server.url}/v1", api_key="none", timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def model(sdk):
    return sdk.models.list().data[0].id


def image_message(*urls: str, text: str = "What is in the picture?") -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u, "detail": "low"}} for u in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def test_models_lists_image_input(vision_server):
    card = httpx.get(f"{vision_server.url}/v1/models").json()["data"][0]
    assert card["architecture"]["input_modalities"] == ["text", "image"]


def test_openai_sdk_with_data_uris(sdk, model):
    red, blue = uri(png((40, 30), (255, 0, 0))), uri(png((40, 30), (0, 0, 255)))
    text_only = sdk.chat.completions.create(model=model, max_tokens=4, temperature=0,
                                            messages=[{"role": "user", "content": "What is in the picture?"}])
    one = sdk.chat.completions.create(model=model, messages=image_message(red), max_tokens=6, temperature=0,
                                      logprobs=True, top_logprobs=5)
    assert one.choices[0].finish_reason in ("length", "stop") and one.usage.completion_tokens >= 1
    # usage counts the image's tokens (16 patches of a 56 px image for the tiny CLIP) besides the text's
    assert one.usage.prompt_tokens - text_only.usage.prompt_tokens >= 10
    again = sdk.chat.completions.create(model=model, messages=image_message(red), max_tokens=6, temperature=0)
    assert again.choices[0].message.content == one.choices[0].message.content
    other = sdk.chat.completions.create(model=model, messages=image_message(blue), max_tokens=6, temperature=0,
                                        logprobs=True, top_logprobs=5)
    first = {t.token: t.logprob for t in one.choices[0].logprobs.content[0].top_logprobs}
    first_other = {t.token: t.logprob for t in other.choices[0].logprobs.content[0].top_logprobs}
    assert first != first_other, "the image must reach the model"
    two = sdk.chat.completions.create(model=model, messages=image_message(red, blue), max_tokens=4, temperature=0)
    assert two.usage.prompt_tokens - one.usage.prompt_tokens >= 10
    stream = sdk.chat.completions.create(model=model, messages=image_message(red), max_tokens=6, temperature=0,
                                         stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == one.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens == one.usage.prompt_tokens


def test_generate_with_image_data(vision_server):
    url = vision_server.url
    red = uri(png((40, 30), (255, 0, 0)))
    plain = httpx.post(f"{url}/generate", json={"prompt": "Describe.", "max_tokens": 4}, timeout=120).json()
    for image_data in (red, {"url": red}, [red], [{"url": red, "detail": "auto"}]):
        r = httpx.post(f"{url}/generate", json={"prompt": "Describe.", "image_data": image_data, "max_tokens": 4,
                                                "temperature": 0}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["meta_info"]["prompt_tokens"] - plain["meta_info"]["prompt_tokens"] >= 10
    marked = httpx.post(f"{url}/generate", json={"prompt": "<IMAGE_TOKEN>\nDescribe.", "image_data": [red],
                                                 "max_tokens": 4, "temperature": 0}, timeout=120).json()
    front = httpx.post(f"{url}/generate", json={"prompt": "Describe.", "image_data": [red], "max_tokens": 4,
                                                "temperature": 0}, timeout=120).json()
    assert marked["output_ids"] == front["output_ids"]      # both put the image before the text
    r = httpx.post(f"{url}/generate", json={"prompt": "<image> and <image>", "image_data": [red], "max_tokens": 2},
                   timeout=120)
    assert r.status_code == 400, r.text         # the engine's placeholder count check, as a 400
    r = httpx.post(f"{url}/generate", json={"input_ids": [1, 2, 3], "image_data": [red], "max_tokens": 2})
    assert r.status_code == 400, r.text


def test_responses_and_messages_take_images(vision_server, model):
    url = vision_server.url
    b64 = base64.b64encode(png((40, 30), (255, 0, 0))).decode()
    r = httpx.post(f"{url}/v1/responses", json={"model": model, "max_output_tokens": 4, "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "What is it?"},
                                     {"type": "input_image", "image_url": f"data:image/png;base64,{b64}"}]}]},
                   timeout=120)
    assert r.status_code == 200, r.text
    r = httpx.post(f"{url}/v1/messages", json={"model": model, "max_tokens": 4, "messages": [
        {"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                  "data": b64}},
                                     {"type": "text", "text": "What is it?"}]}]}, timeout=120)
    assert r.status_code == 200, r.text
    r = httpx.post(f"{url}/v1/messages", json={"model": model, "max_tokens": 4, "messages": [
        {"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                  "data": "bm90IGFuIGltYWdl"}}]}]}, timeout=120)
    assert r.status_code == 400 and "messages[0].content[0].source" in r.text


def test_urls_file_and_http(vision_server, media_dir, media_server, model):  # noqa: F811
    def chat(*urls):
        return httpx.post(f"{vision_server.url}/v1/chat/completions", timeout=120,
                          json={"model": model, "messages": image_message(*urls), "max_tokens": 2})
    assert chat(f"file://{media_dir}/red.png").status_code == 200
    assert chat(f"{media_server}/ok.png").status_code == 200
    r = chat(f"file://{media_dir}/../outside.png")
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content[0].image_url"
    assert "outside" in r.json()["error"]["message"]
    r = chat(uri(png()), f"{media_server}/page")
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content[1].image_url"


BAD = {
    "not an image": uri(b"hello there"),
    "truncated": uri(png((64, 64), (1, 2, 3))[:70]),
    "20k x 20k": uri(png_header_only(20_000, 20_000)),
    "svg": uri(b'<svg xmlns="http://www.w3.org/2000/svg"/>', "image/svg+xml"),
    "svg as png": uri(b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>'),
    "bad base64": "data:image/png;base64,%%%",
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_images_are_400_naming_the_part(vision_server, model, case):
    body = {"model": model, "max_tokens": 2, "messages": image_message(uri(png()), BAD[case])}
    r = httpx.post(f"{vision_server.url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "messages[0].content[1].image_url" and err["type"] == "invalid_request_error", err
    r = httpx.post(f"{vision_server.url}/generate", json={"prompt": "x", "image_data": [BAD[case]], "max_tokens": 2},
                   timeout=120)
    assert r.status_code == 400 and r.json()["error"]["param"] == "image_data[0]", r.text
    ok = httpx.post(f"{vision_server.url}/v1/chat/completions", timeout=120,
                    json={"model": model, "max_tokens": 2, "messages": image_message(uri(png()))})
    assert ok.status_code == 200, ok.text


def test_limits_and_first_frames(vision_server, model):
    url = vision_server.url
    r = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": model, "max_tokens": 2, "messages": image_message(*[uri(png())] * (MAX_IMAGES + 1))})
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_images", r.text
    r = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": model, "max_tokens": 2, "messages": image_message(uri(png((2100, 2100)), "image/png"))})
    assert r.status_code == 400 and "--max-image-pixels" in r.text
    for data, kind in ((gif_animated(), "image/gif"), (png((20, 20), mode="CMYK", color=(0, 0, 0, 0), fmt="JPEG"),
                                                       "image/jpeg"), (png((20, 20), mode="LA", color=(0, 0)),
                                                                       "image/png")):
        r = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
            "model": model, "max_tokens": 2, "messages": image_message(uri(data, kind))})
        assert r.status_code == 200, r.text
    bad_detail = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri(png()),
                                                                                   "detail": "ultra"}}]}]
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": model, "messages": bad_detail}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content[0].image_url.detail"


def test_text_only_model_keeps_its_400(api_server_url):
    card = httpx.get(f"{api_server_url}/v1/models").json()["data"][0]
    assert card["architecture"]["input_modalities"] == ["text"]
    body = {"model": card["id"], "messages": image_message(uri(png())), "max_tokens": 2}
    r = httpx.post(f"{api_server_url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "not_supported"
    assert r.json()["error"]["param"] == "messages[0].content[0]"
    r = httpx.post(f"{api_server_url}/generate", json={"prompt": "x", "image_data": uri(png())}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "image_data"


@pytest.mark.slow
def test_web_page_attaches_an_image_and_streams_the_answer(vision_server):
    from test_web import CHROMIUM, open_page, wait_reply_done
    import os
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no chromium at {CHROMIUM}")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            page = open_page(browser, vision_server.url)
            page.wait_for_selector("#attach", state="visible")
            page.set_input_files("#attach-input", files=[{"name": "red.png", "mimeType": "image/png",
                                                           "buffer": png((40, 30), (255, 0, 0))}])
            page.wait_for_selector("#attachments .attachment img")
            page.fill("[data-setting=max_tokens]", "6")
            page.fill("#prompt", "What is in the picture?")
            page.press("#prompt", "Enter")
            wait_reply_done(page, 120)
            assert page.locator(".msg.user .images img").count() == 1
            stats = page.locator(".msg.assistant .stats").last.inner_text()
            assert "6 tokens" in stats, stats
            assert not page.locator(".msg.assistant .msg-error").last.inner_text()
            assert not page.errors, page.errors
        finally:
            browser.close()
