"""Process entry points: `run_proxy` (one uvicorn process) and `launch` (N api_servers + a proxy on one machine,
LMDeploy's "multiple api servers" recipe without hand-written scripts).
"""
from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time

import httpx

from lmserve.proxy.config import ProxyConfig

logger = logging.getLogger("lmserve.proxy")


def run_proxy(config: ProxyConfig) -> int:
    import uvicorn

    from lmserve.proxy.app import build_app

    from lmserve.server.tls import TLSFiles, uvicorn_ssl_kwargs

    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tls = TLSFiles(config.ssl_keyfile, config.ssl_certfile, config.ssl_ca_certs)
    uvicorn.run(build_app(config), host=config.server_name, port=config.server_port,
                log_level=config.log_level.lower(), timeout_graceful_shutdown=5, **uvicorn_ssl_kwargs(tls))
    return 0


def proxy_argv(config: ProxyConfig) -> list[str]:
    argv = ["serve", "proxy", "--server-name", config.server_name, "--server-port", str(config.server_port),
            "--strategy", config.strategy, "--health-check-interval", str(config.health_check_interval),
            "--log-level", config.log_level, "--serving-strategy", config.serving_strategy]
    if config.api_keys:
        argv += ["--api-keys", *config.api_keys]
    if config.node_file:
        argv += ["--node-file", config.node_file]
    for flag, values in (("--admin-api-keys", config.admin_api_keys),
                         ("--allowed-node-hosts", config.allowed_node_hosts)):
        if values:
            argv += [flag, *values]
    for flag, value in (("--ssl-keyfile", config.ssl_keyfile), ("--ssl-certfile", config.ssl_certfile),
                        ("--ssl-ca-certs", config.ssl_ca_certs), ("--node-ca-certs", config.node_ca_certs)):
        if value:
            argv += [flag, value]
    argv += ["--max-retries", str(config.max_retries), "--breaker-threshold", str(config.breaker_threshold)]
    if config.breaker_cooldown is not None:
        argv += ["--breaker-cooldown", str(config.breaker_cooldown)]
    return argv


def _wait_until(url: str, procs: list[subprocess.Popen], timeout: float, check=lambda r: True) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            return False
        try:
            r = httpx.get(url, timeout=2.0)
            if r.status_code == 200 and check(r):
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False


def _stop(procs: list[subprocess.Popen], timeout: float = 30.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)  # clean shutdown: api_servers deregister from the proxy
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def launch(config: ProxyConfig, num_servers: int, server_argv: list[str], base_port: int = 23333,
           server_name: str = "127.0.0.1", startup_timeout: float = 600.0, roles: list[str] | None = None) -> int:
    """Start a proxy, then `num_servers` api_servers on base_port, base_port+1, ... registered with it via
    --proxy-url; supervise them until Ctrl-C or until one exits. `server_argv`: the api_server's MODEL and
    engine options; `roles`: server i's --role (DistServe). Exit code: 0 after Ctrl-C, 1 if a process died."""
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _interrupt)   # `docker stop`, `kill`: stop the children as Ctrl-C does
    python = [sys.executable, "-m", "lmserve"]
    proxy_host = "127.0.0.1" if config.server_name in ("0.0.0.0", "::") else config.server_name
    proxy_url = f"http://{proxy_host}:{config.server_port}"
    proxy = subprocess.Popen(python + proxy_argv(config))
    servers: list[subprocess.Popen] = []
    try:
        if not _wait_until(f"{proxy_url}/health", [proxy], 60.0):
            logger.error("the proxy did not start")
            return 1
        for i in range(num_servers):
            # NOTE: --allow-terminate-by-client so that the proxy's /nodes/terminate can stop them.
            argv = ["serve", "api_server", *server_argv, "--server-name", server_name,
                    "--server-port", str(base_port + i), "--proxy-url", proxy_url, "--allow-terminate-by-client"]
            if roles:
                argv += ["--role", roles[i]]
            if config.api_keys:
                argv += ["--api-keys", *config.api_keys]
            if config.admin_api_keys:
                argv += ["--proxy-admin-key", config.admin_api_keys[0]]
            logger.info("starting api_server %d/%d: lmserve %s", i + 1, num_servers, " ".join(argv))
            servers.append(subprocess.Popen(python + argv))
        ready = _wait_until(f"{proxy_url}/health", [proxy, *servers], startup_timeout,
                            check=lambda r: r.json().get("num_healthy_nodes", 0) >= num_servers)
        if not ready:
            dead = [p for p in [proxy, *servers] if p.poll() is not None]
            for p in dead:     # say which one, rather than a timeout that did not happen
                logger.error("%s exited with %s during start-up; stopping all", " ".join(map(str, p.args[2:])),
                             p.returncode)
            if not dead:
                logger.error("not all api_servers came up within %.0f s", startup_timeout)
            return 1
        logger.info("%d api_server(s) behind the proxy at %s (strategy %s); Ctrl-C stops all", num_servers,
                    proxy_url, config.strategy)
        while True:
            for p in [proxy, *servers]:
                if p.poll() is not None:
                    logger.error("process %s exited with %s; stopping all", p.args, p.returncode)
                    return 1
            time.sleep(1.0)
    except KeyboardInterrupt:
        return 0
    finally:
        _stop(servers)
        _stop([proxy])
