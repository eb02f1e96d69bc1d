"""The proxy forwards image requests as they came (a multi-MB data: URI reaches the node byte for byte) and
bounds request bodies with --max-request-body-bytes (413 in the OpenAI error shape, then it keeps serving)."""
from __future__ import annotations

import base64
import os

import httpx
import pytest
from test_proxy_fakes import ServerThread, fake_node_app

from lmserve.proxy.app import build_app
from lmserve.proxy.config import ProxyConfig

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def proxy_with_node():
    node = ServerThread(fake_node_app("n0")).start()
    proxy = ServerThread(build_app(ProxyConfig(server_name="127.0.0.1", health_check_interval=60.0,
                                               max_request_body_bytes=8 << 20))).start()
    assert httpx.post(f"{proxy.url}/nodes/add", json={"url": node.url}).status_code == 200
    yield proxy, node
    proxy.stop(force=True)
    node.stop(force=True)


def image_body(num_bytes: int) -> dict:
    uri = "data:image/png;base64," + base64.b64encode(os.urandom(num_bytes)).decode()
    return {"model": "fake-model", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": uri, "detail": "high"}}]}]}


def test_image_bodies_forwarded_as_is_and_bounded(proxy_with_node):
    proxy, node = proxy_with_node
    body = image_body(4 << 20)      # 4 MiB of image: 5.3 MiB of base64, under the 8 MiB bound
    r = httpx.post(f"{proxy.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert node.app.state.requests[-1][1] == body
    r = httpx.post(f"{proxy.url}/generate", json={"prompt": "hi", "image_data": [body["messages"][0]["content"][1]
                                                                                  ["image_url"]["url"]]}, timeout=60)
    assert r.status_code == 200 and node.app.state.requests[-1][0] == "/generate"

    big = image_body(7 << 20)       # 9.3 MiB of base64
    r = httpx.post(f"{proxy.url}/v1/chat/completions", json=big, timeout=60)
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert err["code"] == "request_too_large" and "--max-request-body-bytes" in err["message"]

    def chunked():                  # no Content-Length: counted as it arrives
        import json
        data = json.dumps(big).encode()
        for i in range(0, len(data), 1 << 20):
            yield data[i:i + (1 << 20)]
    r = httpx.post(f"{proxy.url}/v1/chat/completions", content=chunked(), timeout=60,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert httpx.post(f"{proxy.url}/v1/chat/completions", json=image_body(10), timeout=60).status_code == 200
