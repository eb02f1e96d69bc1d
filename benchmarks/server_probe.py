"""A server process under measurement: started in its own session on 127.0.0.1, waited on until /health answers,
its memory sampled (RSS, PSS: mapped file pages included) and capped, and stopped with everything it forked."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time

import httpx
import psutil

GIB = 2**30


class ServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def git_commit(repo: str) -> str:
    def git(*a):
        return subprocess.run(["git", "-C", repo, *a], capture_output=True, text=True, check=False).stdout.strip()
    commit = git("rev-parse", "--short=12", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no", "--", "lmserve"):
        commit += "+dirty"
    return f"{commit} ({git('log', '-1', '--format=%s')[:80]})"


def llama_cpp_version(peers_dir: str) -> str:
    """What benchmarks/build_llama_cpp.sh recorded (the sdist carries no .git for llama.cpp to report itself)."""
    try:
        with open(os.path.join(peers_dir, "LLAMA_CPP_VERSION")) as f:
            return f.read().strip()
    except OSError:
        return "unknown"


# a first start compiles lmserve's kernels in child processes: their memory is the compiler's, not the server's
BUILD_TOOLS = {"cc1plus", "cc1", "c++", "g++", "gcc", "as", "ld", "collect2", "ninja", "sh"}


def tree_memory(pid: int, full: bool = True) -> dict:
    """RSS / PSS / USS in bytes, summed over the process and its descendants (build tools left out).

    full=False reads RSS only (/proc/PID/statm, microseconds). PSS and USS walk /proc/PID/smaps: 20-60 ms of kernel
    time for a server with a model mapped, on one of the cores the server computes on, so the watcher must not
    read them: polled every 0.2 s they cut lmserve's measured decode by 25% (39.6 -> 29.9 tok/s, 1B Q4_0)."""
    total = {"rss": 0, "pss": 0, "uss": 0} if full else {"rss": 0}
    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return total
    for p in procs:
        try:
            if p.pid != pid and p.name() in BUILD_TOOLS:
                continue
            m = p.memory_full_info() if full else p.memory_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for k in total:
            total[k] += getattr(m, k, 0)
    return total


class Server:
    def __init__(self, cmd: list[str], env: dict, port: int, log_path: str, max_rss_gib: float, startup_s: float,
                 min_free_gib: float = 1.5, cwd: str | None = None):
        self.cmd, self.env, self.log_path = cmd, env, log_path
        self.url = f"http://127.0.0.1:{port}"
        self.max_rss = max_rss_gib * GIB
        self.min_free = min_free_gib * GIB
        self.cwd = cwd
        self.startup_s = startup_s
        self.peak_rss = 0
        self.killed_for_memory = None
        self.kill_reason = ""
        self.proc = None
        self._stop = threading.Event()

    def memory(self) -> dict:
        return {k: v for k, v in tree_memory(self.proc.pid).items()}

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            rss = tree_memory(self.proc.pid, full=False)["rss"]
            self.peak_rss = max(self.peak_rss, rss)
            # NOTE: also when the machine runs short: it is shared, and the OOM killer might pick someone else
            short = psutil.virtual_memory().available < self.min_free
            if (rss > self.max_rss or short) and self.proc.poll() is None:
                self.killed_for_memory = rss
                self.kill_reason = (f"machine short of memory (available < {self.min_free / GIB:.1f} GiB)" if short
                                    else f"RSS passed --max-rss-gib {self.max_rss / GIB:.0f}")
                self._kill(signal.SIGKILL)
                return

    def _kill(self, sig) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def __enter__(self):
        log = open(self.log_path, "a")
        log.write(f"\n$ {' '.join(self.cmd)}\n")
        log.flush()
        t0 = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env},
                                     start_new_session=True, cwd=self.cwd)
        log.close()
        threading.Thread(target=self._watch, daemon=True).start()
        try:
            self._wait_healthy(t0)
        except BaseException:
            self.__exit__(None, None, None)     # a start interrupted (SIGTERM, ^C) leaves no server behind
            raise
        return self

    def _wait_healthy(self, t0: float) -> None:
        while True:
            if self.proc.poll() is not None:
                self._fail(f"exited with {self.proc.returncode} during start-up")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - t0 > self.startup_s:
                self._fail(f"not healthy after {self.startup_s:.0f} s")
            time.sleep(0.3)
        self.startup_s = time.monotonic() - t0

    def _fail(self, what: str):
        self.__exit__(None, None, None)
        if self.killed_for_memory:
            what = f"killed at RSS {self.killed_for_memory / GIB:.1f} GiB: {self.kill_reason}"
        with open(self.log_path, errors="replace") as f:
            tail = f.read()[-600:]
        raise ServerError(f"{what}; log {self.log_path}: ...{tail}")

    def __exit__(self, *exc):
        self._stop.set()
        if self.proc is not None and self.proc.poll() is None:
            self._kill(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self._kill(signal.SIGKILL)
                self.proc.wait(30)
        if exc and exc[0] is not None and self.killed_for_memory:
            raise ServerError(f"killed at RSS {self.killed_for_memory / GIB:.1f} GiB: {self.kill_reason}") from exc[1]
        return False
