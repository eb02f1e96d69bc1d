"""Without admin keys, control endpoints answer only to loopback clients. The non-loopback caller lives in a
network namespace this test creates, joined to the host by a veth pair with addresses from 198.18.0.0/15 (the
benchmarking range): no traffic leaves the machine. Skipped where network namespaces are not available (not root,
no `ip`); the namespace and the veth pair are removed at the end."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import httpx
import pytest
from conftest import API_SERVER_ARGS, _free_port
from test_proxy_fakes import fake_node_app
from tls_certs import TLSServerThread

from lmserve.proxy.app import build_app
from lmserve.proxy.config import ProxyConfig

pytestmark = pytest.mark.timeout(300)

HOST_IP, NS_IP = "198.18.226.1", "198.18.226.2"
# runs inside the namespace: one request per (method, url), prints [status, ...]
CALLER = ("import httpx, json, sys\nout = []\nfor method, url in json.loads(sys.argv[1]):\n"
          "    try:\n        out.append(httpx.request(method, url, timeout=30).status_code)\n"
          "    except httpx.HTTPError as e:\n        out.append(repr(e))\nprint(json.dumps(out))\n")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture(scope="module")
def netns():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2")
    name, host_if, ns_if = f"lms{os.getpid()}", f"lmh{os.getpid()}"[:15], f"lmn{os.getpid()}"[:15]
    try:
        _ip("netns", "add", name)
    except (subprocess.CalledProcessError, OSError) as e:
        pytest.skip(f"cannot create a network namespace: {e}")
    try:
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _ip("link", "set", ns_if, "netns", name)
        _ip("addr", "add", f"{HOST_IP}/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("netns", "exec", name, "ip", "addr", "add", f"{NS_IP}/30", "dev", ns_if)
        _ip("netns", "exec", name, "ip", "link", "set", ns_if, "up")
        _ip("netns", "exec", name, "ip", "link", "set", "lo", "up")
    except subprocess.CalledProcessError as e:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        pytest.skip(f"cannot set up a veth pair: {e.stderr.decode(errors='replace')}")

    def call(requests: list[tuple[str, str]]) -> list:
        r = subprocess.run(["ip", "netns", "exec", name, sys.executable, "-c", CALLER, json.dumps(requests)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)
    yield call
    subprocess.run(["ip", "link", "del", host_if], capture_output=True)
    subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_proxy_control_refused_from_outside_without_admin_keys(netns):
    proxy = TLSServerThread(build_app(ProxyConfig(server_name=HOST_IP, health_check_interval=60.0)),
                            host=HOST_IP).start()
    node = TLSServerThread(fake_node_app("n0")).start()
    try:
        control = [("POST", "/nodes/add"), ("POST", "/nodes/remove"), ("POST", "/nodes/terminate"),
                   ("GET", "/nodes/terminate_all")]
        got = netns([("GET", f"{proxy.url}/health"), ("GET", f"{proxy.url}/nodes/status")] +
                    [(m, f"{proxy.url}{p}?node_url={node.url}") for m, p in control])
        assert got == [200, 200] + [403] * len(control), got
        assert httpx.get(f"{proxy.url}/nodes/status").json() == {}    # nothing was added
        assert not node.app.state.terminated
    finally:
        proxy.stop(force=True)
        node.stop(force=True)


def test_api_server_control_refused_from_outside_without_admin_keys(netns, smollm2_path, tmp_path):
    port = _free_port()
    log_path = tmp_path / "api_server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "lmserve", "serve", "api_server", *API_SERVER_ARGS,
                                 "--server-name", HOST_IP, "--server-port", str(port), "--allow-terminate-by-client",
                                 "--log-level", "INFO"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://{HOST_IP}:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        control = [("GET", "/terminate"), ("POST", "/sleep"), ("POST", "/wakeup"), ("POST", "/update_weights"),
                   ("POST", "/v1/load_lora_adapter"), ("POST", "/distserve/connect")]
        got = netns([("GET", f"{url}/v1/models"), ("GET", f"{url}/is_sleeping")] +
                    [(m, url + p) for m, p in control])
        assert got == [200, 200] + [403] * len(control), got
        assert httpx.get(f"{url}/is_sleeping").json() == {"is_sleeping": False} and proc.poll() is None
        log = log_path.read_text()
        assert "answer only to loopback clients" in log                 # said at start-up
        assert f"control GET /terminate from {NS_IP}" in log and "refused (403 loopback_only)" in log
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
