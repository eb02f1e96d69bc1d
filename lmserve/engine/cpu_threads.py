"""How many CPU threads the model may use: the CPUs this process may run on (affinity, cgroup quota), less the
CPUs other processes are busy on right now.

Why: an OpenMP parallel region ends when its slowest thread ends. With as many threads as cores and one core
taken by a neighbour (a browser, another pod, a build), one thread waits for a time slice in every region and
throughput collapses 15-40x (docs/benchmarks.md, "CPU contention"); one thread fewer loses only that core's
share. `ThreadGovernor` samples /proc/stat between engine steps and sets torch's thread count to the CPUs the
others leave free. Busy time of our own threads is subtracted, so the count does not chase itself.
"""
from __future__ import annotations

import logging
import math
import os
import time

import torch

logger = logging.getLogger(__name__)

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cgroup_cpu_limit() -> float | None:
    """CPUs allowed by a cgroup quota (v2 cpu.max, or v1 cfs quota/period); None when unlimited or unknown."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
            quota = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
            period = int(f.read())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def allowed_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (rounded up)."""
    n = len(allowed_cpus())
    quota = _cgroup_cpu_limit()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def _siblings(cpu: int, sysfs: str) -> frozenset[int]:
    """The hardware threads sharing `cpu`'s core (sysfs thread_siblings_list: "0,4" or "0-1"); {cpu} if unknown."""
    try:
        with open(f"{sysfs}/cpu{cpu}/topology/thread_siblings_list") as f:
            text = f.read().strip()
    except OSError:
        return frozenset({cpu})
    out = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return frozenset(out)


def default_threads(sysfs: str = "/sys/devices/system/cpu") -> tuple[int, str]:
    """(threads, why): one per physical core among the CPUs we may use, capped by the cgroup quota.

    Why cores, not CPUs: a batch-1 decode step is ~200 tiny parallel regions, each waiting for its slowest thread.
    Two SMT siblings of one core share its load/FMA ports and caches, so splitting a small matmul across both
    mostly adds synchronisation (a 2-vCPU VM is often exactly one core's two siblings); llama.cpp also defaults to
    the physical core count. With one thread per core (no SMT) this is the CPU count, as before."""
    cpus = allowed_cpus()
    cores = {_siblings(c, sysfs) & frozenset(cpus) for c in cpus}
    n, why = len(cores), f"{len(cores)} physical cores among {len(cpus)} allowed CPUs"
    quota = _cgroup_cpu_limit()
    if quota is not None and math.ceil(quota) < n:
        n, why = max(1, math.ceil(quota)), f"cgroup CPU quota {quota:g} ({why})"
    return max(1, n), why


def _busy_jiffies(cpus: set[int]) -> int | None:
    """Non-idle time (in clock ticks) summed over `cpus`, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            lines = f.readlines()
    except OSError:
        return None
    busy = 0
    for line in lines:
        if not line.startswith("cpu") or line.startswith("cpu "):
            continue
        name, *fields = line.split()
        if int(name[3:]) in cpus:
            values = [int(v) for v in fields[:8]]
            busy += sum(values) - values[3] - values[4]      # minus idle and iowait
    return busy


class ThreadGovernor:
    """Adjusts torch's intra-op thread count between engine steps to the CPUs other processes leave free.

    Call `maybe_adjust()` from the thread that runs the model (OpenMP thread counts are per calling thread)."""

    def __init__(self, max_threads: int | None = None, interval: float = 0.5, drop_after: float = 6.0):
        self.cpus = set(allowed_cpus())
        self.max_threads = max_threads or default_threads()[0]
        self.interval = interval
        self.drop_after = drop_after
        self.num_threads = self.max_threads
        self._last_time = time.monotonic()
        self._last_busy = _busy_jiffies(self.cpus)
        self._last_own = time.process_time()
        self._lower_since: float | None = None
        self.enabled = self._last_busy is not None and self.max_threads > 1

    def start(self) -> None:
        torch.set_num_threads(self.num_threads)

    def maybe_adjust(self) -> None:
        now = time.monotonic()
        if not self.enabled or now - self._last_time < self.interval:
            return
        busy, own = _busy_jiffies(self.cpus), time.process_time()
        if busy is None:
            return
        elapsed = now - self._last_time
        others = max(0.0, (busy - self._last_busy) / _CLK_TCK - (own - self._last_own)) / elapsed
        self._last_time, self._last_busy, self._last_own = now, busy, own
        want = max(1, min(self.max_threads, round(len(self.cpus) - others)))
        # NOTE: give threads up slowly, take them back at once. Neighbours that are busy for a few seconds (a load
        # generator's start-up: ~4 s of a full CPU for `bench serve`, an import, a health check) cost less than
        # running a burst's prefill on half the cores; only contention that lasts drop_after seconds counts.
        if want >= self.num_threads:
            self._lower_since = None
        elif self._lower_since is None:
            self._lower_since = now
        if want > self.num_threads or (want < self.num_threads and now - self._lower_since >= self.drop_after):
            logger.info("other processes use %.1f of %d CPUs: model threads %d -> %d", others, len(self.cpus),
                        self.num_threads, want)
            self.num_threads = want
            torch.set_num_threads(want)
            self._lower_since = None
