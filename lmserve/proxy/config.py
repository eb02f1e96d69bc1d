"""ProxyConfig: everything the proxy needs, in one frozen dataclass.

It lives here rather than in `lmserve/config.py` because that module imports torch, and the proxy must start
without torch or the engine.
"""
from __future__ import annotations

from dataclasses import dataclass

STRATEGIES = ("random", "min_expected_latency", "min_observed_latency", "prefix_aware")
SERVING_STRATEGIES = ("Hybrid", "DistServe")     # LMDeploy's --serving-strategy (proxy/distserve.py)


@dataclass(frozen=True)
class ProxyConfig:
    server_name: str = "0.0.0.0"
    server_port: int = 8000
    strategy: str = "prefix_aware"
    api_keys: tuple[str, ...] = ()
    node_file: str | None = None          # JSON file the node list is saved to and restored from
    health_check_interval: float = 5.0    # seconds between health check rounds
    health_check_timeout: float = 2.0     # per-node timeout of one check
    connect_timeout: float = 5.0          # proxy -> node connection timeout
    request_timeout: float = 600.0        # max seconds between two bytes from a node (read timeout)
    max_retries: int = 3                  # extra attempts when a node fails before the first byte
    retry_backoff: float = 0.05           # seconds before the first retry; doubled per retry, jittered (retry.py)
    retry_backoff_max: float = 1.0
    breaker_threshold: int = 3            # consecutive failures that open a node's circuit breaker (breaker.py)
    # seconds open before a half-open probe may close it; None: one health interval, so a restarted node is back
    # in rotation within one health interval of answering again
    breaker_cooldown: float | None = None
    # trust boundaries (server/auth.py, server/tls.py)
    admin_api_keys: tuple[str, ...] = ()  # guard /nodes/add|remove|terminate*; none: loopback callers only
    allowed_node_hosts: tuple[str, ...] = ()  # CIDRs / hostnames nodes may live at; empty: any (allowlist.py)
    node_ca_certs: str | None = None      # CA for https:// nodes (default: the system store)
    node_ssl_certfile: str | None = None  # client certificate presented to nodes
    node_ssl_keyfile: str | None = None
    ssl_keyfile: str | None = None        # the proxy serves HTTPS when both are given
    ssl_certfile: str | None = None
    ssl_ca_certs: str | None = None       # require client certificates signed by this CA
    # prefix_aware: the leading `prefix_max_chars` characters of a prompt, hashed in blocks of `prefix_block_chars`
    prefix_block_chars: int = 128
    prefix_max_chars: int = 8192
    prefix_table_size: int = 100_000      # block hashes remembered (LRU)
    prefix_min_match_chars: int = 256     # a shorter match (unless half the prompt) is not worth routing on
    # prefix_aware: a node with more than `balance_factor` x the mean outstanding requests is not given more work
    balance_factor: float = 1.5
    max_sessions: int = 100_000           # session_id -> node pins remembered (LRU)
    max_response_routes: int = 100_000    # /v1/responses id -> node remembered for previous_response_id (LRU)
    serving_strategy: str = "Hybrid"      # DistServe: prefill and decode on nodes of those roles
    # 413 beyond; image requests carry base64 data: URIs, so keep it >= the nodes' own --max-request-body-bytes
    max_request_body_bytes: int = 16 << 20
    log_level: str = "INFO"

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy: unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.serving_strategy not in SERVING_STRATEGIES:
            raise ValueError(f"serving_strategy: choose one of {', '.join(SERVING_STRATEGIES)}")
        if self.health_check_interval <= 0:
            raise ValueError("health_check_interval must be > 0")
        if self.health_check_timeout <= 0:
            raise ValueError("health_check_timeout must be > 0")
        if self.max_request_body_bytes < 1:
            raise ValueError("max_request_body_bytes must be >= 1")
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if self.retry_backoff < 0 or self.retry_backoff_max < 0:
            raise ValueError("retry_backoff must be >= 0")
        if self.breaker_threshold < 1 or (self.breaker_cooldown is not None and self.breaker_cooldown < 0):
            raise ValueError("breaker_threshold must be >= 1 and breaker_cooldown >= 0")

    @property
    def breaker_cooldown_s(self) -> float:
        return self.health_check_interval if self.breaker_cooldown is None else self.breaker_cooldown
        if self.prefix_block_chars < 1 or self.prefix_max_chars < self.prefix_block_chars:
            raise ValueError("prefix_block_chars must be >= 1 and <= prefix_max_chars")
        if self.balance_factor < 1.0:
            raise ValueError("balance_factor must be >= 1.0")
