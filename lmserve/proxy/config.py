"""ProxyConfig: everything the proxy needs, in one frozen dataclass.

It lives here rather than in `lmserve/config.py` because that module imports torch, and the proxy must start
without torch or the engine.
"""
from __future__ import annotations

from dataclasses import dataclass

STRATEGIES = ("random", "min_expected_latency", "min_observed_latency", "prefix_aware")


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
    max_retries: int = 2                  # extra nodes tried when a node fails before the first byte
    # prefix_aware: the leading `prefix_max_chars` characters of a prompt, hashed in blocks of `prefix_block_chars`
    prefix_block_chars: int = 128
    prefix_max_chars: int = 8192
    prefix_table_size: int = 100_000      # block hashes remembered (LRU)
    prefix_min_match_chars: int = 256     # a shorter match (unless half the prompt) is not worth routing on
    # prefix_aware: a node with more than `balance_factor` x the mean outstanding requests is not given more work
    balance_factor: float = 1.5
    max_sessions: int = 100_000           # session_id -> node pins remembered (LRU)
    max_response_routes: int = 100_000    # /v1/responses id -> node remembered for previous_response_id (LRU)
    log_level: str = "INFO"

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy: unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.health_check_interval <= 0:
            raise ValueError("health_check_interval must be > 0")
        if self.health_check_timeout <= 0:
            raise ValueError("health_check_timeout must be > 0")
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if self.prefix_block_chars < 1 or self.prefix_max_chars < self.prefix_block_chars:
            raise ValueError("prefix_block_chars must be >= 1 and <= prefix_max_chars")
        if self.balance_factor < 1.0:
            raise ValueError("balance_factor must be >= 1.0")
