"""Backoff between retries of a request that failed before its first byte (forward.py): exponential with
jitter, capped, so a burst of failures does not hammer the nodes left in lockstep."""
from __future__ import annotations

import asyncio
import random


def backoff_delay(retry: int, base: float, cap: float, rand=random.random) -> float:
    """Seconds to wait before retry number `retry` (1, 2, ...): base * 2^(retry-1), capped, times 0.5..1."""
    if retry < 1 or base <= 0:
        return 0.0
    return min(cap, base * 2 ** (retry - 1)) * (0.5 + 0.5 * rand())


async def sleep_before_retry(retry: int, base: float, cap: float) -> None:
    delay = backoff_delay(retry, base, cap)
    if delay:
        await asyncio.sleep(delay)
