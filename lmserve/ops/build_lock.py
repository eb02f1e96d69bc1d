"""The kernel build lock: an flock that says who holds it.

A start that finds the CPU kernels being compiled by another process used to sit silently for minutes. The
holder now writes its pid, its start time and its command into the lock file as soon as it has the lock, and a
waiter logs that within a second ("waiting for another process to finish compiling the CPU kernels: pid 1234,
holding it since 11:20:03 UTC (42 s): python -m lmserve ..."), then again every `REMIND_S` while it waits. A
holder that wrote nothing (an older lmserve) is found in /proc/locks.

The flock itself is what excludes (the kernel drops it when its holder dies, so a killed build never leaves a
lock anyone waits on); the text is only the explanation, and a stale text from a dead holder is overwritten by
the next one to take the lock.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import sys
import time

logger = logging.getLogger(__name__)

POLL_S = 0.2
REMIND_S = 30.0
# how long a waiter waits before it says so; also gives a new holder time to write its line
_HOLDER_GRACE_S = 1.0


def _describe_self() -> dict:
    cmd = " ".join(sys.argv) or sys.executable
    return {"pid": os.getpid(), "since": time.time(), "cmd": cmd[:200]}


def read_holder(f) -> dict | None:
    """The holder's {"pid", "since", "cmd"} from the open lock file, or None if it has not written it (yet)."""
    try:
        f.seek(0)
        return json.loads(f.read() or "null")
    except (OSError, ValueError):
        return None


def holder_from_proc_locks(f) -> dict | None:
    """Who holds the flock on f, from the kernel's table (Linux): for a holder that wrote nothing (an older lmserve,
    or one that has not written yet). Its start time stands for "since"."""
    try:
        st = os.fstat(f.fileno())
        inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        with open("/proc/locks") as locks:
            for line in locks:
                parts = line.split()
                # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF" ("->" marks a blocked waiter: one more field)
                if "->" not in parts and len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == inode:
                    pid = int(parts[4])
                    with open(f"/proc/{pid}/cmdline", "rb") as c:
                        cmd = c.read().replace(b"\0", b" ").decode(errors="replace").strip()
                    return {"pid": pid, "since": _process_start(pid), "cmd": cmd[:200]}
    except (OSError, ValueError):
        pass
    return None


def _process_start(pid: int) -> float:
    """A process's start time (epoch seconds): boot time + field 22 of /proc/PID/stat (after the ')' of comm)."""
    with open(f"/proc/{pid}/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/stat") as f:
        btime = next(int(line.split()[1]) for line in f if line.startswith("btime"))
    return btime + ticks / os.sysconf("SC_CLK_TCK")


def describe_holder(info: dict | None) -> str:
    if not info:
        return "another process (it has not said which)"
    since = info.get("since", 0.0)
    stamp = time.strftime("%H:%M:%S UTC", time.gmtime(since))
    return f"pid {info.get('pid')}, holding it since {stamp} ({time.time() - since:.0f} s): {info.get('cmd', '?')}"


def acquire(lock_path: str, deadline: float, what: str = "the CPU kernels"):
    """An exclusive flock on lock_path (the open file; close it to release), or None if another live process
    still holds it at `deadline` (time.monotonic()). While waiting, logs who holds it."""
    f = open(lock_path, "a+")
    t0 = time.monotonic()
    next_log = None         # when to (re)log the wait; None: not yet logged
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            now = time.monotonic()
            # NOTE: after a grace period, not on the first miss: a holder that only loads a finished build keeps
            # the lock for a moment, which is no wait worth a warning
            if now - t0 >= _HOLDER_GRACE_S and (next_log is None or now >= next_log):
                info = read_holder(f) or holder_from_proc_locks(f)
                verb = "waiting" if next_log is None else "still waiting"
                logger.warning("%s for another process to finish compiling %s: %s (lock %s; giving up in %.0f s)",
                               verb, what, describe_holder(info), lock_path, max(deadline - now, 0))
                next_log = now + REMIND_S
            if now >= deadline:
                f.close()
                return None
            time.sleep(POLL_S)
    if next_log is not None:
        logger.warning("the other build of %s finished after %.0f s of waiting", what, time.monotonic() - t0)
    try:
        f.truncate(0)
        f.write(json.dumps(_describe_self()))
        f.flush()
    except OSError:     # the text is an explanation only; the flock is the lock
        pass
    return f


def release(f) -> None:
    """Drop the lock taken by acquire(), clearing the holder's line so nobody reads it as current."""
    try:
        f.truncate(0)
    except OSError:
        pass
    f.close()
