"""Fault isolation: one request must never take the engine down (issue 25).

A step that raises while preparing, executing or sampling is retried without its suspects: the scheduled
requests are bisected, each half executed on its own, until the request(s) whose presence makes the step fail
are found. Those fail alone (RequestFailedError, which the API turns into a 500 or an SSE error event); every
other request keeps this step's result and carries on. Re-executing a sequence's step is safe: the forward pass
writes the same K/V into the same slots, and nothing in the sequence moves until the step's result is applied.

When the engine loop itself cannot continue (an error outside a step: the scheduler, the output path),
`recover` resets it in place: the KV cache is freed, requests in flight fail, requests that have not started
stay queued. AsyncEngine drives that and bounds how often it may happen.

FaultInjector is test-only: it raises inside the sampler, the model forward, a kernel call (an op of the op
table) or the scheduler for requests whose prompt contains a marker. It is installed only when the config asks
for it AND the environment sets LMSERVE_ENABLE_TEST_HOOKS=1, so a production config cannot turn it on.
"""
from __future__ import annotations

import logging
import os
from collections import deque
from dataclasses import dataclass

from lmserve.engine.executor import ExecutorFailed
from lmserve.engine.model_runner import RunnerOutput
from lmserve.engine.scheduler import SchedulerOutput
from lmserve.engine.sequence import SequenceStatus
from lmserve.outputs import FinishReason

logger = logging.getLogger(__name__)

TEST_HOOKS_ENV = "LMSERVE_ENABLE_TEST_HOOKS"
FAULT_KINDS = ("sampler", "forward", "kernel", "loop")


class RequestFailedError(RuntimeError):
    """The engine failed this request (its step raised, or the engine restarted while it ran); others go on."""

    def __init__(self, request_id: str, message: str):
        super().__init__(message)
        self.request_id = request_id


@dataclass
class FaultStats:
    num_faults: int = 0          # steps that raised (not counting the retries that isolate the cause)
    num_isolated: int = 0        # requests failed because a step raised with them in it
    num_restarts: int = 0        # engine-loop restarts


def _describe(exc: BaseException) -> str:
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


# ---- a step that survives ------------------------------------------------------------------------------------
def execute_isolated(engine, sched: SchedulerOutput):
    """engine.executor.execute(sched), bisecting on failure. -> (merged RunnerOutput of the steps that ran,
    {request_id: RequestFailedError} of the requests that had to go). The caller drops the failed requests'
    entries from `sched` before applying it."""
    try:
        return engine.executor.execute(sched), {}
    except ExecutorFailed:
        raise                  # a tensor-parallel rank is gone: nothing to isolate
    except Exception as exc:   # noqa: BLE001 - any step error is a suspect request's until shown otherwise
        engine.fault_stats.num_faults += 1
        groups: dict[str, list] = {}
        for s in sched.scheduled:   # the n sequences of a request fail or pass together
            groups.setdefault(s.seq.request_id, []).append(s)
        logger.error("engine step failed (%s) with %d request(s) in it; retrying without the suspects: %s",
                     _describe(exc), len(groups), ", ".join(groups))
        failed: dict[str, RequestFailedError] = {}
        outputs: list[RunnerOutput] = []
        _bisect(engine, list(groups.values()), exc, failed, outputs)
        merged = RunnerOutput()
        for out in outputs:
            for name in ("sampled_token_ids", "verified", "logprobs", "prompt_logprobs", "pooled"):
                getattr(merged, name).update(getattr(out, name))
        return merged, failed


def _bisect(engine, groups: list[list], exc: BaseException, failed: dict, outputs: list) -> None:
    if len(groups) == 1:
        rid = groups[0][0].seq.request_id
        engine.fault_stats.num_isolated += 1
        logger.error("request %s failed: the engine step raised %s with it in the batch", rid, _describe(exc))
        failed[rid] = RequestFailedError(rid, f"the engine failed this request: {_describe(exc)}")
        return
    mid = len(groups) // 2
    for half in (groups[:mid], groups[mid:]):
        sub = SchedulerOutput(scheduled=[s for g in half for s in g])
        sub.num_batched_tokens = sum(s.num_new_tokens for s in sub.scheduled)
        try:
            outputs.append(engine.executor.execute(sub))
        except ExecutorFailed:
            raise
        except Exception as e:  # noqa: BLE001 - narrowed further
            _bisect(engine, half, e, failed, outputs)


def drop_failed(engine, sched: SchedulerOutput, failed: dict[str, RequestFailedError]) -> list:
    """Take the failed requests out of the step and the engine. -> their errors, for the outputs."""
    if not failed:
        return []
    sched.scheduled = [s for s in sched.scheduled if s.seq.request_id not in failed]
    return [fail_request(engine, rid, err) for rid, err in failed.items()]


def fail_request(engine, request_id: str, err: RequestFailedError) -> RequestFailedError:
    req = engine.requests.pop(request_id, None)
    for seq in (req.seqs if req is not None else ()):
        engine.scheduler.finish(seq, FinishReason.ABORT)     # frees its KV blocks
    return err


# ---- an engine loop that restarts ------------------------------------------------------------------------------
def recover(engine, cause: BaseException) -> list[RequestFailedError]:
    """Reset the engine after its loop died: every KV block free, requests in flight failed, requests that never
    ran kept in arrival order. -> the failed requests' errors."""
    engine.fault_stats.num_restarts += 1
    failed, kept = [], []
    for rid, req in list(engine.requests.items()):
        fresh = all(s.status is SequenceStatus.WAITING and s.num_output_tokens == 0 and s.num_preemptions == 0
                    for s in req.seqs)
        if fresh:
            kept.extend(req.seqs)
            continue
        del engine.requests[rid]
        for seq in req.seqs:
            seq.status, seq.finish_reason = SequenceStatus.FINISHED, FinishReason.ABORT
        logger.error("request %s failed: the engine restarted after %s", rid, _describe(cause))
        failed.append(RequestFailedError(rid, f"the engine restarted after an error ({_describe(cause)}) "
                                              "while this request ran; please retry"))
    for seq in kept:
        seq.block_table, seq.block_hashes, seq.num_computed_tokens = [], [], 0
    engine.block_manager.free_all()
    engine.sessions.clear()      # their pinned blocks went with the reset
    sch = engine.scheduler
    sch.running = []
    sch.waiting = deque(sorted(kept, key=lambda s: (s.arrival_time, s.seq_id)))
    return failed


# ---- test-only fault injection ---------------------------------------------------------------------------------
def parse_fault_spec(spec: str) -> dict[str, tuple[str, int]]:
    """"KIND:MARKER[@N][,...]" -> {kind: (marker, N)}: KIND in FAULT_KINDS ("kernel" may be "kernel=OP", an op of
    the op table; default rms_norm); the fault fires once the request has N output tokens (default 0)."""
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        kind, sep, rest = part.partition(":")
        marker, _, after = rest.partition("@")
        if not sep or not marker or kind.split("=")[0] not in FAULT_KINDS or not (after or "0").isdigit():
            raise ValueError(f"fault_injection: {part!r} is not KIND:MARKER[@N] with KIND in {FAULT_KINDS}")
        out[kind] = (marker, int(after or 0))
    return out


class FaultInjector:
    """Raises inside the engine for requests whose prompt text contains a marker (tests only; see module doc)."""

    def __init__(self, engine, spec: str):
        if os.environ.get(TEST_HOOKS_ENV) != "1":
            raise ValueError(f"fault_injection is a test hook: set {TEST_HOOKS_ENV}=1 to use it")
        self.faults = parse_fault_spec(spec)
        self.after = {k.split("=")[0]: n for k, (_, n) in self.faults.items()}
        self.marked: dict[str, set[str]] = {}       # request id -> fault kinds it triggers
        self.batch: set[str] = set()                # request ids of the step being executed
        self.engine = engine
        self._wrap(engine)
        logger.warning("TEST fault injection is on: %s", spec)

    def _wrap(self, engine) -> None:
        runner = engine.runner
        add, execute, schedule = engine.enqueue_request, engine.executor.execute, engine.scheduler.schedule

        def enqueue_request(request_id, prompt_token_ids, params, *args, **kwargs):
            add(request_id, prompt_token_ids, params, *args, **kwargs)
            text = engine.tokenizer.decode(engine.requests[request_id].prompt_token_ids)
            kinds = {k.split("=")[0] for k, (m, _) in self.faults.items() if m in text}
            if kinds:
                self.marked[request_id] = kinds

        def execute_step(sched):
            self.batch = {s.seq.request_id for s in sched.scheduled}
            for rid in [r for r in self.marked if r not in engine.requests]:
                del self.marked[rid]
            return execute(sched)

        def schedule_step():
            # a loop death fires once per marked request, while it is still queued (so it is kept across the restart)
            for rid, kinds in self.marked.items():
                if "loop" in kinds:
                    kinds.discard("loop")
                    raise RuntimeError(f"injected engine-loop fault (request {rid})")
            return schedule()

        engine.enqueue_request, engine.executor.execute, engine.scheduler.schedule = enqueue_request, execute_step, \
            schedule_step
        runner.sampler = self._raising(runner.sampler, "sampler")
        runner.forward = self._raising(runner.forward, "forward")
        kernel = next((k for k in self.faults if k.startswith("kernel")), None)
        if kernel is not None:
            op = kernel.partition("=")[2] or "rms_norm"
            # the table keeps each op twice (impls, and plain attributes for speed): replace both
            runner.ops.impls[op] = self._raising(runner.ops.impls[op], "kernel")
            setattr(runner.ops, op, runner.ops.impls[op])

    def _raising(self, fn, kind: str):
        def wrapper(*args, **kwargs):
            hit = [rid for rid in self.batch if kind in self.marked.get(rid, ()) and
                   self.engine.requests[rid].seqs[0].num_output_tokens >= self.after[kind]]
            if hit:
                raise RuntimeError(f"injected {kind} fault (request {', '.join(sorted(hit))})")
            return fn(*args, **kwargs)
        return wrapper
