"""The CPU thread governor: thread count from affinity/quota, and fewer threads while other processes keep CPUs
busy (fed synthetic /proc/stat busy times, so the test does not depend on what else runs on the machine)."""
from __future__ import annotations

import os

import pytest
import torch

from lmserve.engine import cpu_threads
from lmserve.engine.cpu_threads import ThreadGovernor, available_cpus


def test_available_cpus_respects_affinity():
    assert 1 <= available_cpus() <= len(os.sched_getaffinity(0))


@pytest.fixture
def fake_proc(monkeypatch):
    """Two CPUs; `feed(others_cpus)` advances the clock by 1 s with `others_cpus` CPUs of others' busy time."""
    clock = {"t": 1000.0, "busy": 0, "own": 0.0}
    monkeypatch.setattr(cpu_threads, "allowed_cpus", lambda: [0, 1])
    monkeypatch.setattr(cpu_threads, "_cgroup_cpu_limit", lambda: None)
    monkeypatch.setattr(cpu_threads, "_busy_jiffies", lambda cpus: clock["busy"])
    monkeypatch.setattr(cpu_threads.time, "monotonic", lambda: clock["t"])
    monkeypatch.setattr(cpu_threads.time, "process_time", lambda: clock["own"])

    def feed(others: float, own: float = 1.0):
        clock["t"] += 1.0
        clock["own"] += own
        clock["busy"] += int((others + own) * cpu_threads._CLK_TCK)
    old = torch.get_num_threads()
    yield feed
    torch.set_num_threads(old)


def test_governor_drops_a_thread_for_a_busy_neighbour_and_takes_it_back(fake_proc):
    gov = ThreadGovernor(interval=0.5)
    gov.start()
    assert gov.enabled and gov.num_threads == 2
    fake_proc(others=0.05, own=2.0)
    gov.maybe_adjust()
    assert gov.num_threads == 2               # our own busy threads do not count as contention
    fake_proc(others=1.0)
    gov.maybe_adjust()
    assert gov.num_threads == 2               # one sample is not enough (no flapping on a burst)
    fake_proc(others=1.0)
    gov.maybe_adjust()
    assert gov.num_threads == 1 and torch.get_num_threads() == 1
    fake_proc(others=0.0)
    gov.maybe_adjust()
    fake_proc(others=0.0)
    gov.maybe_adjust()
    assert gov.num_threads == 2 and torch.get_num_threads() == 2
