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
    for _ in range(5):                        # a load generator starting up: ~5 s of a full CPU
        fake_proc(others=1.0)
        gov.maybe_adjust()
        assert gov.num_threads == 2           # short bursts next door do not cost us a thread
    fake_proc(others=0.0)
    gov.maybe_adjust()
    for _ in range(6):                        # a neighbour that stays busy
        fake_proc(others=1.0)
        gov.maybe_adjust()
    assert gov.num_threads == 2               # 5 s after it started: still ours
    fake_proc(others=1.0)
    gov.maybe_adjust()
    assert gov.num_threads == 1 and torch.get_num_threads() == 1
    fake_proc(others=0.0)
    gov.maybe_adjust()
    assert gov.num_threads == 2 and torch.get_num_threads() == 2   # taken back at the first free sample


def fake_sysfs(tmp_path, siblings: dict[int, str]):
    for cpu, text in siblings.items():
        d = tmp_path / f"cpu{cpu}" / "topology"
        d.mkdir(parents=True)
        (d / "thread_siblings_list").write_text(text + "\n")
    return str(tmp_path)


@pytest.mark.parametrize("siblings,allowed,quota,want", [
    ({0: "0-1", 1: "0-1"}, [0, 1], None, 1),                      # a 2-vCPU VM = one core's two SMT siblings
    ({0: "0", 1: "1"}, [0, 1], None, 2),                          # one thread per core (this machine): unchanged
    ({0: "0,4", 1: "1,5", 2: "2,6", 3: "3,7", 4: "0,4", 5: "1,5", 6: "2,6", 7: "3,7"},
     list(range(8)), None, 4),                                    # 4 cores x 2 threads, Linux's sibling numbering
    ({0: "0,4", 1: "1,5", 2: "2,6", 3: "3,7", 4: "0,4", 5: "1,5", 6: "2,6", 7: "3,7"},
     [0, 4, 1], None, 2),                                         # an affinity mask covering 2 of the cores
    ({0: "0,4", 1: "1,5", 2: "2,6", 3: "3,7", 4: "0,4", 5: "1,5", 6: "2,6", 7: "3,7"},
     list(range(8)), 2.5, 3),                                     # a cgroup quota below the core count wins
    ({}, [0, 1, 2], None, 3),                                     # no topology in sysfs: one core per CPU
])
def test_default_threads_counts_physical_cores(tmp_path, monkeypatch, siblings, allowed, quota, want):
    monkeypatch.setattr(cpu_threads, "allowed_cpus", lambda: allowed)
    monkeypatch.setattr(cpu_threads, "_cgroup_cpu_limit", lambda: quota)
    n, why = cpu_threads.default_threads(fake_sysfs(tmp_path, siblings))
    assert n == want, why
    assert ("quota" in why) == (quota is not None and quota < len(allowed))


def test_default_threads_on_this_machine_is_one_per_core():
    n, _ = cpu_threads.default_threads()
    cores = {open(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list").read()
             for c in os.sched_getaffinity(0)
             if os.path.exists(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list")}
    assert 1 <= n <= available_cpus()
    if cores and len(cores) == len(os.sched_getaffinity(0)) and cpu_threads._cgroup_cpu_limit() is None:
        assert n == available_cpus()          # no SMT: the same count as before
