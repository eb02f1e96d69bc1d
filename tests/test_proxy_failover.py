"""Proxy failover when a node is SIGKILLed: every request that got no byte yet is served by the node left, even
with keep-alive connections to the dead node in the pool and a survivor too busy to answer health checks in
time. Fake nodes run as subprocesses (so they can be SIGKILLed); the proxy runs in-process."""
from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import time

import httpx
import pytest
from test_proxy_fakes import ServerThread, free_port

from lmserve.proxy.app import build_app
from lmserve.proxy.config import ProxyConfig

pytestmark = pytest.mark.timeout(120)

_FAKE = ("import json, sys, uvicorn; sys.path.insert(0, sys.argv[1]); from test_proxy_fakes import fake_node_app; "
         "app = fake_node_app(sys.argv[2]); app.state.behavior.update(json.loads(sys.argv[4])); "
         "uvicorn.run(app, host='127.0.0.1', port=int(sys.argv[3]), log_level='error')")


def start_fake(name: str, **behavior) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", _FAKE, os.path.dirname(__file__), name, str(port),
                             json.dumps(behavior)])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(f"{url}/v1/models", timeout=1)
            return proc, url
        except httpx.HTTPError:
            assert time.monotonic() < deadline and proc.poll() is None, "fake node did not start"
            time.sleep(0.1)


@pytest.mark.parametrize("stream", [False, True])
def test_sigkilled_node_loses_no_request(stream):
    dead, dead_url = start_fake("dead")
    # the survivor takes 0.3 s per request and, while busy, 0.5 s per health check: under load, checks time out
    alive, alive_url = start_fake("alive", first_delay=0.3, busy_health_delay=0.5)
    proxy = ServerThread(build_app(ProxyConfig(server_name="127.0.0.1", strategy="random",
                                               health_check_interval=0.3, health_check_timeout=0.2))).start()
    try:
        for url in (dead_url, alive_url):
            assert httpx.post(f"{proxy.url}/nodes/add", json={"url": url, "status": {"models": ["fake-model"]}},
                              timeout=10).status_code == 200
        body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
        with httpx.Client(timeout=60) as client:
            # warm the proxy's keep-alive pool to both nodes
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda _: client.post(f"{proxy.url}/v1/chat/completions", json=body), range(16)))
            dead.kill()
            dead.wait()

            def send(_):
                r = client.post(f"{proxy.url}/v1/chat/completions", json=body)
                ok = r.status_code == 200 and (not stream or "data: [DONE]" in r.text)
                return ok, r.status_code, r.text[:200]
            with concurrent.futures.ThreadPoolExecutor(24) as pool:
                results = list(pool.map(send, range(24)))
        failed = [r for r in results if not r[0]]
        assert not failed, f"{len(failed)}/24 failed: {failed[:3]}"
    finally:
        proxy.stop(force=True)
        for p in (dead, alive):
            if p.poll() is None:
                p.kill()
                p.wait()
