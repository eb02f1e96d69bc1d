"""The proxy app over HTTP, in front of fake api_servers (tests/test_proxy_fakes.py): the LMDeploy wire contract,
errors, failover, mid-stream errors, chunk-by-chunk streaming, API keys, the node file, health checks."""
from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from test_proxy_fakes import ServerThread, fake_node_app, free_port

from lmserve.proxy.app import build_app
from lmserve.proxy.config import ProxyConfig

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def cluster():
    """start(n, **proxy_config) -> (proxy, [nodes]); every node serves 'fake-model'; all stopped at the end."""
    started = []

    def start(num_nodes: int = 2, register: bool = True, **kw):
        kw.setdefault("health_check_interval", 60.0)   # tests trigger what they need
        nodes = [ServerThread(fake_node_app(f"n{i}")).start() for i in range(num_nodes)]
        proxy = ServerThread(build_app(ProxyConfig(server_name="127.0.0.1", **kw))).start()
        started.extend(nodes + [proxy])
        if register:
            for n in nodes:
                r = httpx.post(f"{proxy.url}/nodes/add", json={"url": n.url}, headers=_auth(kw))
                assert r.status_code == 200, r.text
        return proxy, nodes

    yield start
    for s in reversed(started):
        s.stop(force=True)


def _auth(kw) -> dict:
    keys = kw.get("api_keys")
    return {"Authorization": f"Bearer {keys[0]}"} if keys else {}


def chat_body(stream: bool = False, **kw) -> dict:
    return {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "stream": stream, **kw}


def assert_openai_error(r: httpx.Response, status: int, code: str | None = None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["message"]
    if code:
        assert err["code"] == code


def test_routes_every_endpoint_and_lists_models(cluster):
    proxy, nodes = cluster(2, strategy="random")
    models = httpx.get(f"{proxy.url}/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["fake-model"]
    for path in ("/v1/chat/completions", "/v1/completions", "/generate", "/v1/embeddings", "/v1/encode", "/pooling"):
        r = httpx.post(f"{proxy.url}{path}", json=chat_body())
        assert r.status_code == 200, (path, r.text)
        assert r.headers["x-lmserve-node"] in (nodes[0].url, nodes[1].url)
    served = [p for n in nodes for p, _, _ in n.app.state.requests]
    assert sorted(set(served)) == sorted(["/v1/chat/completions", "/v1/completions", "/generate", "/v1/embeddings",
                                          "/v1/encode", "/pooling"])
    # the openai client works through the proxy
    client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="none")
    out = client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}])
    assert out.choices[0].message.content.startswith("hello from n")


def test_errors_are_openai_shaped(cluster):
    proxy, _ = cluster(0)
    assert_openai_error(httpx.post(f"{proxy.url}/v1/chat/completions", json=chat_body()), 503, "no_available_node")
    httpx.post(f"{proxy.url}/nodes/add", json={"url": ServerThread(fake_node_app("x")).start().url})
    assert_openai_error(httpx.post(f"{proxy.url}/v1/chat/completions", json=chat_body(model="nope")), 404,
                        "model_not_found")
    assert_openai_error(httpx.post(f"{proxy.url}/v1/completions", content=b"{nope"), 400)
    assert_openai_error(httpx.post(f"{proxy.url}/nodes/add", json={"status": {}}), 400)
    assert_openai_error(httpx.post(f"{proxy.url}/nodes/remove", json={"url": "http://127.0.0.1:9"}), 404)
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="x").completions.create(model="nope", prompt="a")


def test_model_served_only_by_unhealthy_nodes_is_503(cluster):
    proxy, nodes = cluster(1)
    nodes[0].app.state.behavior["health_status"] = 500
    httpx.post(f"{proxy.url}/nodes/add", json={"url": nodes[0].url})   # re-adding runs a check
    assert_openai_error(httpx.post(f"{proxy.url}/v1/chat/completions", json=chat_body()), 503, "no_available_node")


def test_lmdeploy_node_bodies(cluster):
    proxy, nodes = cluster(2, register=False)
    full = {"url": nodes[0].url, "status": {"latency": [{}], "models": ["fake-model"], "role": 1, "speed": 3,
                                            "unfinished": 1}}
    assert httpx.post(f"{proxy.url}/nodes/add", json=full).status_code == 200
    assert httpx.post(f"{proxy.url}/nodes/add", json={"url": nodes[1].url.removeprefix("http://")}).status_code == 200
    status = httpx.get(f"{proxy.url}/nodes/status").json()
    assert set(status) == {nodes[0].url, nodes[1].url}
    s0 = status[nodes[0].url]
    assert s0["models"] == ["fake-model"] and s0["speed"] == 3 and s0["unfinished"] == 0 and s0["is_healthy"]
    assert set(s0) >= {"models", "speed", "unfinished", "latency"}
    # remove: LMDeploy's body, and older LMDeploy's ?node_url=
    assert httpx.post(f"{proxy.url}/nodes/remove", json={"url": nodes[0].url}).status_code == 200
    assert httpx.post(f"{proxy.url}/nodes/remove", params={"node_url": nodes[1].url}).status_code == 200
    assert httpx.get(f"{proxy.url}/nodes/status").json() == {}


def test_terminate_and_terminate_all(cluster):
    proxy, nodes = cluster(3)
    r = httpx.post(f"{proxy.url}/nodes/terminate", json={"url": nodes[0].url})
    assert r.status_code == 200 and r.json()["terminated"] and nodes[0].app.state.terminated
    r = httpx.get(f"{proxy.url}/nodes/terminate_all")
    assert r.status_code == 200 and all(r.json()["terminated"].values())
    assert all(n.app.state.terminated for n in nodes) and httpx.get(f"{proxy.url}/nodes/status").json() == {}


def test_failover_before_the_first_byte(cluster):
    proxy, nodes = cluster(3, strategy="random", max_retries=2)
    bad_status, bad_crash, good = nodes
    bad_status.app.state.behavior["fail_status"] = 503
    bad_crash.app.state.behavior["die_before_first_chunk"] = True
    for stream in (False, True):
        for _ in range(12):
            r = httpx.post(f"{proxy.url}/v1/chat/completions", json=chat_body(stream=stream))
            assert r.status_code == 200 and r.headers["x-lmserve-node"] == good.url
            if stream:
                assert r.text.endswith("data: [DONE]\n\n")
            for n in (bad_status, bad_crash):   # let the failing nodes back in, to be tried again
                n.app.state.requests.clear()
                httpx.post(f"{proxy.url}/nodes/add", json={"url": n.url})
    metrics = httpx.get(f"{proxy.url}/metrics").text
    assert "lmserve_proxy_failovers_total" in metrics and "lmserve_proxy_failovers_total 0" not in metrics


def test_dead_node_leaves_rotation_and_all_retries_failing_is_503(cluster):
    proxy, nodes = cluster(2, strategy="random")
    nodes[0].stop(force=True)                                   # dead between two health checks
    for _ in range(20):                                         # random picks the dead node at some point
        r = httpx.post(f"{proxy.url}/v1/chat/completions", json=chat_body())
        assert r.status_code == 200 and r.headers["x-lmserve-node"] == nodes[1].url
    assert not httpx.get(f"{proxy.url}/nodes/status").json()[nodes[0].url]["is_healthy"]
    nodes[1].app.state.behavior["fail_status"] = 503            # the only node left answers 503
    r = httpx.post(f"{proxy.url}/v1/chat/completions", json=chat_body())
    assert r.status_code == 503


def test_mid_stream_failure_ends_the_stream_with_an_error_event(cluster):
    proxy, nodes = cluster(1)
    nodes[0].app.state.behavior["die_after_chunks"] = 2
    with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", json=chat_body(stream=True)) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert len(events) == 3 and json.loads(events[0])["choices"][0]["delta"]["content"] == "n00 "
    assert json.loads(events[2])["error"]["code"] == "node_failed"
    nodes[0].app.state.behavior["die_after_chunks"] = 1
    httpx.post(f"{proxy.url}/nodes/add", json={"url": nodes[0].url})
    client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.APIError):
        for _ in client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "x"}],
                                                stream=True):
            pass


def test_ndjson_streams_relay_and_end_with_an_error_line(cluster):
    proxy, nodes = cluster(1)
    nodes[0].app.state.behavior.update(num_chunks=3, chunk_delay=0.2)
    with httpx.stream("POST", f"{proxy.url}/v1/chat/interactive", json={"prompt": "hi", "stream": True}) as r:
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lags = [time.time() - json.loads(line)["t"] for line in r.iter_lines() if line]
    assert len(lags) == 3 and max(lags) < 0.1, lags
    nodes[0].app.state.behavior["die_after_chunks"] = 1
    r = httpx.post(f"{proxy.url}/v1/chat/interactive", json={"prompt": "hi", "stream": True})
    lines = [json.loads(line) for line in r.text.splitlines() if line]
    assert len(lines) == 2 and lines[1]["error"]["code"] == "node_failed"


def test_streams_pass_through_chunk_by_chunk(cluster):
    proxy, nodes = cluster(1)
    nodes[0].app.state.behavior.update(num_chunks=5, chunk_delay=0.2)
    arrivals = []
    with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", json=chat_body(stream=True)) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                arrivals.append(time.time() - json.loads(line[6:])["t"])
    assert len(arrivals) == 5
    assert max(arrivals) < 0.1, arrivals                        # each chunk arrives as the node sends it


def test_client_disconnect_aborts_the_node_stream(cluster):
    proxy, nodes = cluster(1)
    nodes[0].app.state.behavior.update(num_chunks=100, chunk_delay=0.05)
    with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", json=chat_body(stream=True)) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break
    deadline = time.monotonic() + 5
    while nodes[0].app.state.num_active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert nodes[0].app.state.num_active == 0
    assert httpx.get(f"{proxy.url}/nodes/status").json()[nodes[0].url]["unfinished"] == 0


def test_session_affinity(cluster):
    proxy, nodes = cluster(3, strategy="random")
    for session_id in (7, 8, 9, 10):
        served = {httpx.post(f"{proxy.url}/v1/chat/completions", json=chat_body(session_id=session_id))
                  .headers["x-lmserve-node"] for _ in range(6)}
        assert len(served) == 1
    # a busy pinned node answers for its session: the session does not move to a node without its history
    pinned = httpx.post(f"{proxy.url}/v1/completions", json=chat_body(session_id=41)).headers["x-lmserve-node"]
    busy = next(n for n in nodes if n.url == pinned)
    busy.app.state.behavior["fail_status"] = 429
    assert httpx.post(f"{proxy.url}/v1/completions", json=chat_body(session_id=41)).status_code == 429
    busy.app.state.behavior["fail_status"] = None
    assert httpx.post(f"{proxy.url}/v1/completions", json=chat_body(session_id=41)).headers["x-lmserve-node"] == pinned
    # a pinned node that goes away: the session moves, and stays on its new node
    pinned = httpx.post(f"{proxy.url}/v1/completions", json=chat_body(session_id=42)).headers["x-lmserve-node"]
    httpx.post(f"{proxy.url}/nodes/remove", json={"url": pinned})
    moved = {httpx.post(f"{proxy.url}/v1/completions", json=chat_body(session_id=42)).headers["x-lmserve-node"]
             for _ in range(4)}
    assert len(moved) == 1 and pinned not in moved


def test_api_keys(cluster):
    proxy, nodes = cluster(1, api_keys=("k1", "k2"))
    assert httpx.get(f"{proxy.url}/health").status_code == 200          # probes need no key
    assert_openai_error(httpx.post(f"{proxy.url}/v1/chat/completions", json=chat_body()), 401, "invalid_api_key")
    assert_openai_error(httpx.get(f"{proxy.url}/v1/models", headers={"Authorization": "Bearer bad"}), 401)
    assert_openai_error(httpx.post(f"{proxy.url}/nodes/add", json={"url": "http://x:1"}), 401)
    r = httpx.post(f"{proxy.url}/v1/chat/completions", json=chat_body(), headers={"Authorization": "Bearer k2"})
    assert r.status_code == 200
    assert "authorization" not in nodes[0].app.state.requests[-1][2]   # a client's key never reaches a node
    out = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="k1").models.list()
    assert [m.id for m in out.data] == ["fake-model"]


def test_node_list_survives_a_proxy_restart(cluster, tmp_path):
    node_file = str(tmp_path / "nodes.json")
    proxy, nodes = cluster(2, node_file=node_file)
    proxy.stop()
    again = ServerThread(build_app(ProxyConfig(server_name="127.0.0.1", node_file=node_file))).start()
    try:
        status = httpx.get(f"{again.url}/nodes/status").json()
        assert set(status) == {n.url for n in nodes} and all(s["is_healthy"] for s in status.values())
        assert httpx.post(f"{again.url}/v1/chat/completions", json=chat_body()).status_code == 200
    finally:
        again.stop(force=True)


def test_health_checks_take_nodes_out_and_back(cluster):
    proxy, nodes = cluster(2, strategy="random", health_check_interval=0.2, health_check_timeout=0.5)
    nodes[0].app.state.behavior["health_status"] = 503
    time.sleep(0.6)
    assert {httpx.post(f"{proxy.url}/v1/chat/completions", json=chat_body()).headers["x-lmserve-node"]
            for _ in range(8)} == {nodes[1].url}
    nodes[0].app.state.behavior["health_status"] = 200
    time.sleep(0.6)
    assert httpx.get(f"{proxy.url}/nodes/status").json()[nodes[0].url]["is_healthy"]
    # a node that hangs does not hang the checker: the check times out
    nodes[1].app.state.behavior["health_status"] = 200
    assert httpx.get(f"{proxy.url}/health").json()["num_healthy_nodes"] == 2


def test_registration_before_the_node_listens(cluster):
    """LMDeploy's api_server registers from its start-up hook, before it listens: the proxy keeps the node out
    of rotation and probes it until it answers."""
    proxy, _ = cluster(0, health_check_interval=60.0)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    r = httpx.post(f"{proxy.url}/nodes/add", json={"url": url, "status": {"models": ["fake-model"]}})
    assert r.status_code == 200 and not r.json()["status"]["is_healthy"]     # nobody listens on `port` yet
    assert_openai_error(httpx.post(f"{proxy.url}/v1/chat/completions", json=chat_body()), 503)
    node = ServerThread(fake_node_app("late"), port=port).start()
    try:
        deadline = time.monotonic() + 5
        while not httpx.get(f"{proxy.url}/nodes/status").json()[url]["is_healthy"]:
            assert time.monotonic() < deadline, "the proxy did not pick up the late node"
            time.sleep(0.1)
        assert httpx.post(f"{proxy.url}/v1/chat/completions", json=chat_body()).status_code == 200
    finally:
        node.stop(force=True)
