"""The proxy in front of two api_server nodes for the agent APIs: a previous_response_id chain (streamed turns
included) lands on the node that stored the first response, stored-response endpoints go to that node, and once
that node has left, the proxy answers 404 saying so rather than restarting the conversation elsewhere. (The whole
Responses / Messages / tokenize suites also run through this proxy: `agent_url` in tests/conftest.py.)"""
from __future__ import annotations

import json

import httpx
import pytest
from test_proxy_fakes import ServerThread

from lmserve.proxy.app import build_app
from lmserve.proxy.config import ProxyConfig

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _turn(proxy: str, model: str, text: str, previous: str | None = None, stream: bool = False):
    body = {"model": model, "input": text, "max_output_tokens": 4, "temperature": 0, "stream": stream}
    if previous:
        body["previous_response_id"] = previous
    with httpx.stream("POST", f"{proxy}/v1/responses", json=body, timeout=300) as r:
        raw = r.read().decode()
    assert r.status_code == 200, raw
    if stream:
        events = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: ")]
        assert events[-1]["type"] in ("response.completed", "response.incomplete")
        return events[-1]["response"]["id"], r.headers["x-lmserve-node"]
    return json.loads(raw)["id"], r.headers["x-lmserve-node"]


def test_chain_stays_on_the_node_that_stored_it(agent_cluster):
    proxy, nodes = agent_cluster
    model = httpx.get(f"{proxy}/v1/models").json()["data"][0]["id"]
    firsts = {}
    for i in range(6):        # different first prompts, so both nodes get conversations
        rid, node = _turn(proxy, model, f"Conversation {i}: hello {'x' * i}", stream=i % 2 == 1)
        firsts[rid] = node
    assert set(firsts.values()) <= set(nodes)
    for rid, owner in firsts.items():
        previous = rid
        for turn in range(2):
            previous, node = _turn(proxy, model, f"turn {turn}", previous, stream=turn == 1)
            assert node == owner
        got = httpx.get(f"{proxy}/v1/responses/{previous}", timeout=60)
        assert got.status_code == 200 and got.json()["id"] == previous
        assert httpx.get(f"{proxy}/v1/responses/{previous}/input_items", timeout=60).json()["data"]


def test_node_gone_is_a_404_that_says_so(agent_cluster):
    _, nodes = agent_cluster
    proxy = ServerThread(build_app(ProxyConfig(server_name="127.0.0.1", health_check_interval=1.0))).start()
    try:
        for url in nodes:
            assert httpx.post(f"{proxy.url}/nodes/add", json={"url": url}).status_code == 200
        model = httpx.get(f"{proxy.url}/v1/models").json()["data"][0]["id"]
        rid, owner = _turn(proxy.url, model, "Hello there")
        assert httpx.post(f"{proxy.url}/nodes/remove", json={"url": owner}).status_code == 200
        r = httpx.post(f"{proxy.url}/v1/responses", timeout=60,
                       json={"model": model, "input": "again", "previous_response_id": rid})
        assert r.status_code == 404 and r.json()["error"]["param"] == "previous_response_id"
        assert owner in r.json()["error"]["message"] and "left the proxy" in r.json()["error"]["message"]
        assert httpx.get(f"{proxy.url}/v1/responses/{rid}", timeout=60).status_code == 404
        unknown = httpx.get(f"{proxy.url}/v1/responses/resp_unknown", timeout=60)
        assert unknown.status_code == 404 and "resp_unknown" in unknown.json()["error"]["message"]
    finally:
        proxy.stop(force=True)
