"""A bounded schemathesis pass over the server's own openapi.json (issue 25), on the default model.

Fails on any 5xx, any request timeout, and on a server that is not healthy with nothing running at the end.
Fixed seed; a time budget (FUZZ_SECONDS) bounds the pass whatever the machine; generation is kept to a few
tokens per request (tests/schemathesis_hooks.py). /sleep is left out (a sleeping engine answers 503 by design)
and so is /terminate."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import httpx
import pytest
from conftest import start_api_server

pytest.importorskip("schemathesis")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

FUZZ_SECONDS = 90
SEED = 42


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_path):
    s = start_api_server(tmp_path_factory.mktemp("fuzz"), "--cache-block-count", "128", "--session-len", "256",
                         "--max-n", "2", "--max-prompts", "2", "--max-concurrent-requests", "4",
                         "--max-queued-requests", "8", "--kernel-build-timeout", "60", timeout=600)
    yield s
    s.stop()


def _gauge(url: str, name: str) -> float:
    m = re.search(rf"^lmserve:{name} ([0-9.e+]+)$", httpx.get(f"{url}/metrics", timeout=30).text, re.M)
    assert m, name
    return float(m.group(1))


def test_schemathesis_finds_no_5xx_and_leaves_the_server_healthy(server, tmp_path):
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    cli = os.path.join(os.path.dirname(sys.executable), "schemathesis")
    env = dict(os.environ, SCHEMATHESIS_HOOKS="schemathesis_hooks",
               PYTHONPATH=os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")])))
    cmd = [cli, "run", f"{server.url}/openapi.json", "--checks", "not_a_server_error", "--seed", str(SEED),
           "--max-examples", "10", "--max-time", str(FUZZ_SECONDS), "--request-timeout", "60", "--workers", "1",
           "--no-shrink", "--exclude-path", "/sleep", "--exclude-path", "/terminate"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=FUZZ_SECONDS + 300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:] + "\n--- server log ---\n" + server.log_tail(6000)
    assert re.search(r"\d+ generated, \d+ passed", out), out[-3000:]
    # the server is healthy, and nothing the fuzzer started is still running
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    deadline = time.monotonic() + 30
    while _gauge(server.url, "num_requests_running") or _gauge(server.url, "num_requests_waiting"):
        assert time.monotonic() < deadline, "requests still running after the fuzz pass"
        time.sleep(0.5)
    model = httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"][0]["id"]
    r = httpx.post(f"{server.url}/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 2},
                   timeout=60)
    assert r.status_code == 200, r.text
