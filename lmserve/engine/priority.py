"""Scheduling policies: the order of the waiting and running queues (vLLM's `--scheduling-policy`).

fcfs: arrival order; the newest running sequence is preempted first. priority: (priority, arrival) order, lower
priority values first; both queues are kept in that order, so the scheduler's one code path serves the most
urgent sequences first and preempts from the tail, which is the least urgent (the newest among equals).
Pure Python, no torch.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections import deque

    from lmserve.engine.sequence import Sequence

POLICIES = ("fcfs", "priority")


def sort_key(seq: Sequence) -> tuple[int, float, int]:
    # NOTE: seq_id breaks ties between the n sequences of one request (same arrival time)
    return seq.priority, seq.arrival_time, seq.seq_id


def insert_waiting(waiting: deque[Sequence], seq: Sequence, policy: str, front: bool = False) -> None:
    """Queue seq. fcfs: at the back (front=True: at the front, for a preempted sequence); priority: before the
    first queued sequence that sorts after it (a preempted sequence, being older, goes ahead of its equals)."""
    if policy != "priority":
        waiting.appendleft(seq) if front else waiting.append(seq)
        return
    key = sort_key(seq)
    for i, other in enumerate(waiting):
        if sort_key(other) > key:
            waiting.insert(i, seq)
            return
    waiting.append(seq)


def order_running(running: list[Sequence], policy: str) -> None:
    """priority: most urgent first, so the step's budget goes to them and running[-1] is the preemption victim."""
    if policy == "priority":
        running.sort(key=sort_key)


def count_by_priority(seqs: Iterable[Sequence]) -> dict[int, int]:
    return dict(Counter(seq.priority for seq in seqs))
