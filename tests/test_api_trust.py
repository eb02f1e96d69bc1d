"""Roles and TLS on a real api_server (bundled SmolLM2), registered by itself with an https proxy that has admin
keys: client keys get 403 on every control endpoint, the admin key works, a fuzz pass over the control endpoints
with the admin key gets no 5xx, the openai SDK talks https (test CA, client certificates) to the node and to the
proxy, and the proxy reaches the node over TLS with its own client certificate and the node's own key."""
from __future__ import annotations

import json
import os
import random
import ssl
import subprocess
import sys
import time

import httpx
import openai
import pytest
from conftest import API_SERVER_ARGS, _free_port
from tls_certs import CertAuthority, TLSServerThread

from lmserve.proxy.app import build_app
from lmserve.proxy.config import ProxyConfig

pytestmark = pytest.mark.timeout(300)

ADMIN, CLIENT, PROXY_ADMIN = "node-admin-1", "node-client-1", "proxy-admin-1"
# every control endpoint the api_server has today, and ones other features add (guarded by path already)
CONTROL = (("GET", "/terminate"), ("POST", "/sleep"), ("POST", "/wakeup"), ("POST", "/update_weights"),
           ("POST", "/v1/load_lora_adapter"), ("POST", "/v1/unload_lora_adapter"), ("POST", "/distserve/connect"))


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = CertAuthority(str(d))
    return {"ca": ca.ca_path, "node": ca.issue("node"), "proxy": ca.issue("proxy"), "client": ca.issue("client")}


def tls_context(pki, who: str = "client") -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=pki["ca"])
    key, cert = pki[who]
    ctx.load_cert_chain(cert, key)
    return ctx


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, smollm2_path, pki):
    """(proxy_url, node_url): an https proxy (admin key, client certificates, node host allow-list) and one https
    api_server started with --proxy-url, which registers itself with --proxy-admin-key."""
    pkey, pcert = pki["proxy"]
    proxy = TLSServerThread(build_app(ProxyConfig(
        server_name="127.0.0.1", api_keys=("proxy-client-1",), admin_api_keys=(PROXY_ADMIN,),
        allowed_node_hosts=("127.0.0.1/32",), node_ca_certs=pki["ca"], node_ssl_certfile=pcert,
        node_ssl_keyfile=pkey, health_check_interval=0.5)),
        ssl_keyfile=pkey, ssl_certfile=pcert, ssl_ca_certs=pki["ca"], ssl_cert_reqs=ssl.CERT_REQUIRED).start()
    nkey, ncert = pki["node"]
    port = _free_port()
    log_path = os.path.join(str(tmp_path_factory.mktemp("api_trust")), "api_server.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lmserve", "serve", "api_server", *API_SERVER_ARGS, "--server-name", "127.0.0.1",
             "--server-port", str(port), "--api-keys", CLIENT, "--admin-api-keys", ADMIN,
             "--ssl-keyfile", nkey, "--ssl-certfile", ncert, "--ssl-ca-certs", pki["ca"],
             "--proxy-url", proxy.url, "--proxy-admin-key", PROXY_ADMIN, "--log-level", "INFO"],
            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    node_url = f"https://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        with httpx.Client(verify=tls_context(pki, "proxy"), timeout=5) as c:
            while True:
                assert proc.poll() is None, open(log_path).read()[-3000:]
                assert time.monotonic() < deadline, open(log_path).read()[-3000:]
                try:
                    status = c.get(f"{proxy.url}/nodes/status", headers={"Authorization": "Bearer proxy-client-1"})
                    if status.json().get(node_url, {}).get("is_healthy"):
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
        yield proxy.url, node_url, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proxy.stop(force=True)


def test_openai_sdk_over_https_to_node_and_proxy(cluster, pki):
    proxy_url, node_url, _ = cluster
    for url, key in ((node_url, CLIENT), (proxy_url, "proxy-client-1")):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120,
                               http_client=httpx.Client(verify=tls_context(pki)))
        out = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=4,
                                             messages=[{"role": "user", "content": "Hi"}])
        assert out.choices[0].message.content is not None
        chunks = list(client.completions.create(model=out.model, prompt="One, two,", max_tokens=4, stream=True))
        assert chunks and chunks[-1].choices[0].finish_reason == "length"
    # no client certificate, or a CA that does not know the node: no TLS session at all
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{node_url}/health", verify=ssl.create_default_context(cafile=pki["ca"]))
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{node_url}/health", verify=ssl.create_default_context())


def test_client_key_cannot_control_admin_key_can(cluster, pki):
    _, node_url, log_path = cluster
    with httpx.Client(verify=tls_context(pki), timeout=30) as c:
        for method, path in CONTROL:
            for key, status in ((None, 401), (CLIENT, 403), ("guess", 401)):
                r = c.request(method, node_url + path, headers={"Authorization": f"Bearer {key}"} if key else {})
                assert r.status_code == status, (path, key, r.text)
                assert r.json()["error"]["message"]
        admin = {"Authorization": f"Bearer {ADMIN}"}
        assert c.post(f"{node_url}/sleep", params={"level": 1}, headers=admin).status_code == 200
        assert c.get(f"{node_url}/is_sleeping", headers=admin).json()["is_sleeping"]
        assert c.post(f"{node_url}/wakeup", headers=admin).status_code == 200
        # started without --allow-terminate-by-client: the admin gets through the guard, /terminate still says no
        assert c.get(f"{node_url}/terminate", headers=admin).status_code == 403
    with open(log_path) as f:
        log = f.read()
    assert "control POST /sleep from 127.0.0.1" in log and "admin-key#1" in log
    assert ADMIN not in log and CLIENT not in log


def test_fuzz_control_endpoints_with_admin_key(cluster, pki):
    _, node_url, _ = cluster
    rng = random.Random(2026)
    junk = [None, {}, [], "", 0, -1, 3, "x" * 3000, {"serialized_named_tensors": "!!"},
            {"serialized_named_tensors": []}, {"serialized_named_tensors": {"a": "AAAA"}},
            {"serialized_named_tensors": "AAAA", "load_format": "pickle"},
            {"serialized_named_tensors": "AAAA", "load_format": "torch"}, {"lora_name": None}, [{"a": [None]}]]
    failures = []
    with httpx.Client(verify=tls_context(pki), timeout=60, headers={"Authorization": f"Bearer {ADMIN}"}) as c:
        for _ in range(120):
            method, path = rng.choice(CONTROL)
            if path == "/terminate":
                method = rng.choice(["GET", "POST"])
            params = {"level": rng.choice(["1", "2", "0", "-5", "x", "", "99999999999999999999"])}
            kind = rng.randrange(3)
            content = json.dumps(rng.choice(junk)).encode() if kind < 2 else \
                bytes(rng.randrange(256) for _ in range(rng.randrange(1, 80)))
            r = c.request(rng.choice([method, "PUT"]) if kind == 1 else method, node_url + path, params=params,
                          content=content, headers={"content-type": "application/json"})
            if r.status_code >= 500:
                failures.append((method, path, params, r.status_code, r.text[:200]))
        c.post(f"{node_url}/wakeup")
        assert c.get(f"{node_url}/health").status_code == 200
        r = c.post(f"{node_url}/v1/completions", json={"model": "x", "prompt": "Hi", "max_tokens": 2})
        assert r.status_code in (200, 404), r.text
    assert not failures, failures[:5]
