"""Admission: how many generation requests run at once and how many may wait (--max-concurrent-requests,
--max-queued-requests); the server answers 429 beyond that (server/middleware.py)."""
from __future__ import annotations

import asyncio
import contextlib
from collections import deque


class Admission:
    """At most `max_running` requests in flight and `max_queued` waiting (FIFO); anything beyond is refused.

    NOTE: a released slot is handed straight to the oldest waiter, so `num_running` never exceeds the limit and
    a newcomer cannot overtake the queue.
    """

    def __init__(self, max_running: int, max_queued: int):
        self.max_running = max_running
        self.max_queued = max_queued
        self.num_running = 0
        self._waiters: deque[asyncio.Future] = deque()

    @property
    def num_queued(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> bool:
        """True once admitted; False (at once) when the queue is full."""
        if self.num_running < self.max_running and not self._waiters:
            self.num_running += 1
            return True
        if len(self._waiters) >= self.max_queued:
            return False
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()          # the slot was handed to us as we were cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
            raise
        return True

    def release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)    # hand the slot over; num_running is unchanged
                return
        self.num_running -= 1
