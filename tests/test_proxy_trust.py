"""Trust boundaries of the proxy, in front of fake api_servers (tests/test_proxy_fakes.py): admin keys on every
control endpoint, --allowed-node-hosts, per-node keys that are never echoed, a registration hijack that gets
nothing, the circuit breaker (opens, shows in /nodes/status and /metrics, yields affinity, closes), retry backoff,
https nodes verified (client certificates; a wrong certificate is unhealthy), and a fuzz pass (0 5xx)."""
from __future__ import annotations

import json
import logging
import random
import socket
import ssl
import threading
import time

import httpx
import pytest
from test_proxy_fakes import ServerThread, fake_node_app
from tls_certs import CertAuthority, TLSServerThread

from lmserve.proxy.app import build_app
from lmserve.proxy.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from lmserve.proxy.config import ProxyConfig
from lmserve.proxy.retry import backoff_delay

pytestmark = pytest.mark.timeout(120)

CONTROL = (("POST", "/nodes/add", {"url": "http://127.0.0.1:9"}), ("POST", "/nodes/remove", {"url": "http://127.0.0.1:9"}),
           ("POST", "/nodes/terminate", {"url": "http://127.0.0.1:9"}), ("GET", "/nodes/terminate_all", None))
ADMIN, CLIENT, NODE_KEY = "admin-secret-1", "client-secret-1", "node-secret-1"


@pytest.fixture
def servers():
    started = []

    def start(server):
        started.append(server.start())
        return server
    yield start
    for s in reversed(started):
        s.stop(force=True)


def proxy_with(servers, **kw) -> ServerThread:
    kw.setdefault("health_check_interval", 60.0)
    return servers(ServerThread(build_app(ProxyConfig(server_name="127.0.0.1", **kw))))


def bearer(key: str | None) -> dict:
    return {"Authorization": f"Bearer {key}"} if key else {}


def chat(stream: bool = False, **kw) -> dict:
    return {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "stream": stream, **kw}


def test_admin_keys_guard_every_control_endpoint(servers, caplog):
    proxy = proxy_with(servers, api_keys=(CLIENT,), admin_api_keys=(ADMIN,))
    node = servers(ServerThread(fake_node_app("n0")))
    for method, path, body in CONTROL:
        for key, status in ((None, 401), ("wrong", 401), (CLIENT, 403)):
            r = httpx.request(method, proxy.url + path, json=body, headers=bearer(key))
            assert r.status_code == status, (path, key, r.text)
            assert r.json()["error"]["message"] and r.json()["error"]["type"]
    with caplog.at_level(logging.INFO, logger="lmserve.auth"):
        r = httpx.post(f"{proxy.url}/nodes/add", json={"url": node.url}, headers=bearer(ADMIN))
    assert r.status_code == 200, r.text
    assert "admin-key#1" in caplog.text and "127.0.0.1" in caplog.text and ADMIN not in caplog.text
    # the admin key also passes the client gate; a client key serves the API as before
    assert httpx.get(f"{proxy.url}/nodes/status", headers=bearer(ADMIN)).status_code == 200
    assert httpx.post(f"{proxy.url}/v1/chat/completions", json=chat(), headers=bearer(CLIENT)).status_code == 200
    assert httpx.post(f"{proxy.url}/nodes/terminate", json={"url": node.url}, headers=bearer(ADMIN)).json()["terminated"]
    assert node.app.state.terminated


def test_allowed_node_hosts(servers):
    proxy = proxy_with(servers, allowed_node_hosts=("127.0.0.0/8", "node.internal"))
    for url in ("http://10.1.2.3:8000", "http://192.168.0.1", "http://[::2]:80", "http://no-such-host.invalid:1"):
        r = httpx.post(f"{proxy.url}/nodes/add", json={"url": url})
        assert r.status_code == 403 and r.json()["error"]["param"] == "url", r.text
    assert httpx.post(f"{proxy.url}/nodes/add", json={"url": "http://127.0.0.2:9"}).status_code == 200
    assert set(httpx.get(f"{proxy.url}/nodes/status").json()) == {"http://127.0.0.2:9"}


def test_node_keys_are_used_and_never_echoed(servers, tmp_path):
    node_file = tmp_path / "nodes.json"
    proxy = proxy_with(servers, api_keys=(CLIENT, "client-2"), node_file=str(node_file))
    node = servers(ServerThread(fake_node_app("n0")))
    r = httpx.post(f"{proxy.url}/nodes/add", json={"url": node.url, "api_key": NODE_KEY}, headers=bearer(CLIENT))
    assert r.status_code == 200 and NODE_KEY not in r.text
    assert httpx.post(f"{proxy.url}/v1/chat/completions", json=chat(), headers=bearer("client-2")).status_code == 200
    seen = [h.get("authorization") for _, _, h in node.app.state.requests]
    assert seen == [f"Bearer {NODE_KEY}"]                     # the node's key, not the client's nor the proxy's
    status = httpx.get(f"{proxy.url}/nodes/status", headers=bearer(CLIENT))
    assert NODE_KEY not in status.text and status.json()[node.url]["has_api_key"]
    assert NODE_KEY not in httpx.get(f"{proxy.url}/metrics").text
    assert oct(node_file.stat().st_mode & 0o777) == "0o600"   # the node file holds the keys: owner only


def test_registration_hijack_gets_no_request_and_no_credential(servers):
    """An outsider's /nodes/add of a listener it controls is refused; that listener never hears from the proxy,
    while the properly registered node serves every request with its own key."""
    proxy = proxy_with(servers, api_keys=(CLIENT,), admin_api_keys=(ADMIN,), strategy="random",
                       health_check_interval=0.2)
    good = servers(ServerThread(fake_node_app("good")))
    trap = Listener()
    for key in (None, CLIENT, "guess"):
        r = httpx.post(f"{proxy.url}/nodes/add", json={"url": trap.url, "status": {"models": ["fake-model"]}},
                       headers=bearer(key))
        assert r.status_code in (401, 403), r.text
    r = httpx.post(f"{proxy.url}/nodes/add", json={"url": good.url, "api_key": NODE_KEY}, headers=bearer(ADMIN))
    assert r.status_code == 200
    for stream in (False, True) * 4:
        assert httpx.post(f"{proxy.url}/v1/chat/completions", json=chat(stream), headers=bearer(CLIENT)).status_code == 200
    time.sleep(0.5)                                           # a few health rounds
    trap.close()
    assert trap.connections == 0 and trap.received == b""      # not even a TCP connection, let alone a key
    assert len(good.app.state.requests) == 8
    assert {h["authorization"] for _, _, h in good.app.state.requests} == {f"Bearer {NODE_KEY}"}


class Listener:
    """A bare TCP listener under the test's control: counts connections and keeps every byte it is sent."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections, self.received, self._stop = 0, b"", False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.settimeout(0.5)
            try:
                self.received += conn.recv(65536)
            except OSError:
                pass
            conn.close()

    def close(self):
        self._stop = True
        self.thread.join(2)
        self.sock.close()


def test_breaker_unit():
    now = [0.0]
    b = CircuitBreaker(threshold=3, cooldown=5.0, clock=lambda: now[0])
    assert not b.record_failure() and not b.record_failure() and b.state == CLOSED
    assert b.record_failure() and b.state == OPEN and not b.allows()
    b.on_health_ok()
    assert b.state == OPEN                                    # a passing check does not cut the cool-down short
    now[0] = 5.0
    assert b.state == HALF_OPEN and b.allows()
    b.on_attempt()
    assert not b.allows()                                     # one probe at a time
    assert b.record_failure() and b.state == OPEN and b.num_opened == 2
    now[0] = 10.0
    b.on_health_ok()
    assert b.state == CLOSED and b.failures == 0


def test_backoff_grows_is_capped_and_jittered():
    assert backoff_delay(0, 0.05, 1.0) == 0.0
    assert [backoff_delay(i, 0.05, 1.0, rand=lambda: 1.0) for i in (1, 2, 3, 10)] == [0.05, 0.1, 0.2, 1.0]
    assert backoff_delay(3, 0.05, 1.0, rand=lambda: 0.0) == 0.1


def test_breaker_opens_on_failing_node_and_affinity_yields(servers):
    proxy = proxy_with(servers, strategy="random", breaker_threshold=3, breaker_cooldown=60.0, max_retries=3,
                       health_check_interval=0.2)
    bad, good = servers(ServerThread(fake_node_app("bad"))), servers(ServerThread(fake_node_app("good")))
    for n in (bad, good):
        assert httpx.post(f"{proxy.url}/nodes/add", json={"url": n.url}).status_code == 200
    bad.app.state.behavior["fail_status"] = 500               # its /health still says 200
    def one():
        r = httpx.post(f"{proxy.url}/v1/chat/completions", json=chat())
        assert r.status_code == 200 and r.headers["x-lmserve-node"] == good.url
    # "random" picks the bad node about every other request: send until it has failed 3 times (12 requests left
    # that to chance: ~2% of runs saw only 2), then as many again, which must all avoid it
    for _ in range(200):
        if len(bad.app.state.requests) >= 3:
            break
        one()
    for _ in range(12):
        one()
    assert len(bad.app.state.requests) == 3                   # the breaker opened on the 3rd failure
    status = httpx.get(f"{proxy.url}/nodes/status").json()[bad.url]
    assert status["breaker"]["state"] == OPEN and status["breaker"]["times_opened"] == 1
    metrics = httpx.get(f"{proxy.url}/metrics").text
    assert f'lmserve_proxy_node_breaker_state{{node="{bad.url}"}} 2' in metrics
    assert f'lmserve_proxy_node_breaker_opens_total{{node="{bad.url}"}} 1' in metrics
    # a session pinned to the bad node moves (the pin yields to health)
    pinned = {httpx.post(f"{proxy.url}/v1/completions", json=chat(session_id=7)).headers["x-lmserve-node"]
              for _ in range(4)}
    assert pinned == {good.url}
    bad.app.state.behavior["fail_status"] = None
    # NOTE: a long cool-down above keeps a loaded machine from reaching half-open mid-test; shortened now
    proxy.app.state.registry.get(bad.url).breaker.cooldown = 0.3
    deadline = time.monotonic() + 10
    while httpx.get(f"{proxy.url}/nodes/status").json()[bad.url]["breaker"]["state"] != CLOSED:
        assert time.monotonic() < deadline, "the breaker did not close after the cool-down"
        time.sleep(0.1)


def test_https_nodes_are_verified_with_client_certificates(servers, tmp_path):
    ca, rogue = CertAuthority(str(tmp_path)), CertAuthority(str(tmp_path), "rogue CA")
    node_key, node_cert = ca.issue("node")
    proxy_key, proxy_cert = ca.issue("proxy")
    bad_key, bad_cert = rogue.issue("impostor")
    # the good node requires a client certificate from our CA; the impostor's certificate is from another CA
    good = servers(TLSServerThread(fake_node_app("good"), ssl_keyfile=node_key, ssl_certfile=node_cert,
                                   ssl_ca_certs=ca.ca_path, ssl_cert_reqs=ssl.CERT_REQUIRED))
    bad = servers(TLSServerThread(fake_node_app("bad"), ssl_keyfile=bad_key, ssl_certfile=bad_cert))
    proxy = proxy_with(servers, strategy="random", node_ca_certs=ca.ca_path, node_ssl_certfile=proxy_cert,
                       node_ssl_keyfile=proxy_key)
    for n in (good, bad):
        assert httpx.post(f"{proxy.url}/nodes/add", json={"url": n.url}).status_code == 200
    status = httpx.get(f"{proxy.url}/nodes/status").json()
    assert status[good.url]["is_healthy"] and not status[bad.url]["is_healthy"]
    assert "CERTIFICATE_VERIFY_FAILED" in status[bad.url]["last_error"]
    for stream in (False, True) * 3:
        r = httpx.post(f"{proxy.url}/v1/chat/completions", json=chat(stream))
        assert r.status_code == 200 and r.headers["x-lmserve-node"] == good.url
    assert bad.app.state.requests == []
    # without a client certificate the good node refuses the TLS handshake
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{good.url}/health", verify=ssl.create_default_context(cafile=ca.ca_path))


def test_fuzz_control_endpoints_with_admin_key(servers):
    proxy = proxy_with(servers, admin_api_keys=(ADMIN,), allowed_node_hosts=("127.0.0.0/8",))
    rng = random.Random(26)
    junk = [None, "", "x" * 5000, "\x00\ud800", 0, -1, 1e308, True, [], {}, [1, {"a": None}], {"url": None},
            {"url": 5}, {"url": "ftp://x"}, {"url": "http://"}, {"url": "http://[::1"}, {"url": "127.0.0.1:99999"},
            {"url": "http://127.0.0.1:1", "status": {"models": "x"}}, {"url": "http://127.0.0.1:1", "api_key": 7},
            {"url": "http://127.0.0.1:1", "status": {"models": [None], "speed": "fast"}}]
    paths = [p for _, p, _ in CONTROL]
    n5xx = []
    with httpx.Client(timeout=10, headers=bearer(ADMIN)) as client:
        for i in range(300):
            path, method = rng.choice(paths), rng.choice(["GET", "POST", "PUT", "DELETE"])
            kind = rng.randrange(3)
            if kind == 0:
                r = client.request(method, proxy.url + path, content=json.dumps(rng.choice(junk)).encode())
            elif kind == 1:
                r = client.request(method, proxy.url + path, content=bytes(rng.randrange(256) for _ in range(64)))
            else:
                r = client.request(method, proxy.url + path, params={"node_url": rng.choice(["", "x", "http://"])},
                                   content=json.dumps(rng.choice(junk)).encode(),
                                   headers={"content-type": "application/json"})
            if r.status_code >= 500:
                n5xx.append((method, path, r.status_code, r.text[:200]))
    assert not n5xx, n5xx[:5]
    assert httpx.get(f"{proxy.url}/health").status_code == 200
