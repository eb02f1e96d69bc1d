"""Per-node circuit breaker: closed -> open after `threshold` consecutive failures -> half-open after `cooldown`
seconds -> closed by one successful probe (a request, or a passing health check), or open again by a failed one.

Failures counted: requests that fail on the node (connection refused, timeout, a 5xx answer, a stream cut
mid-way). A stale pooled connection (a soft failure, forward.py) and a slow health check are not. While open the
node is out of every routing decision, session and prefix affinity included (nodes.Node.is_routable).
"""
from __future__ import annotations

import time

CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
STATE_CODES = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}   # the /metrics gauge


class CircuitBreaker:
    def __init__(self, threshold: int = 3, cooldown: float = 5.0, clock=time.monotonic):
        self.threshold = threshold
        self.cooldown = cooldown
        self.clock = clock
        self.failures = 0               # consecutive
        self.num_opened = 0             # times it opened (a counter for /metrics)
        self._opened_at: float | None = None
        self._probing = False           # half-open: one request is out as the probe

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return CLOSED
        return OPEN if self.clock() - self._opened_at < self.cooldown else HALF_OPEN

    def allows(self) -> bool:
        state = self.state
        return state == CLOSED or (state == HALF_OPEN and not self._probing)

    def on_attempt(self) -> None:
        if self.state == HALF_OPEN:
            self._probing = True

    def on_done(self) -> None:
        """A request ended (whatever its outcome): a half-open node may take the next probe."""
        self._probing = False

    def record_success(self) -> None:
        self.failures = 0
        self._opened_at = None
        self._probing = False

    def on_health_ok(self) -> None:
        """A passing health check closes a half-open breaker (the probe), never an open one."""
        if self.state == HALF_OPEN:
            self.record_success()

    def record_failure(self) -> bool:
        """Counts one failure; True when this one opened (or re-opened) the breaker."""
        self.failures += 1
        state = self.state
        self._probing = False
        if state == HALF_OPEN or (state == CLOSED and self.failures >= self.threshold):
            self._opened_at = self.clock()
            self.num_opened += 1
            return True
        return False

    def status(self) -> dict:
        return {"state": self.state, "consecutive_failures": self.failures, "times_opened": self.num_opened}
