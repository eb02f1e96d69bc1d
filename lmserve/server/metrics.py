"""Prometheus metrics under `lmserve:` names, in a registry of the app's own (no global state).

Engine gauges and counters are read from `engine.get_stats()` at scrape time; per-request latencies are
observed by the server when a request ends, from the engine's RequestMetrics (monotonic seconds).
"""
from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from lmserve.outputs import RequestOutput

# () -> (HTTP requests admitted, HTTP requests queued for admission, interactive sessions): the server's own gauges.
# NOTE: a callable rather than the ServerState, so metrics does not import the state that owns it.
ServerGauges = Callable[[], tuple[int, int, int]]

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                    40.0, 80.0, 160.0, 320.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


class _EngineCollector:
    """Scrape-time view of the engine and the admission queue."""

    def __init__(self, engine, server_gauges: ServerGauges):
        self.engine = engine
        self.server_gauges = server_gauges

    def collect(self):
        s = self.engine.get_stats(memory=True)   # memory read now: a scrape, not every step, pays for smaps

        def gauge(name, doc, value):
            g = GaugeMetricFamily(f"lmserve:{name}", doc)
            g.add_metric([], float(value))
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(f"lmserve:{name}", doc)
            c.add_metric([], float(value))
            return c

        mem = GaugeMetricFamily("lmserve:memory_bytes", "Memory by kind: weights_gguf (GGUF blocks), "
                                "weights_gguf_repacked (of those, repacked copies in private memory), "
                                "weights_gguf_repacked_shared (repacked, mapped from the shared repack cache), "
                                "weights_gguf_resident (of the memory-mapped file, resident now), weights_float, weights_packed "
                                "(GEMM copies), kv_cache, process_rss", labels=["kind"])
        for kind, value in s.memory.items():
            mem.add_metric([kind], float(value))
        yield mem
        yield gauge("num_requests_running", "Sequences in the engine's running batch", s.num_running)
        yield gauge("num_requests_waiting", "Sequences waiting in the engine's queue", s.num_waiting)
        for name, counts in (("running", s.running_by_priority), ("waiting", s.waiting_by_priority)):
            g = GaugeMetricFamily(f"lmserve:num_requests_{name}_by_priority",
                                  f"Sequences {name} per request priority level", labels=["priority"])
            for level, n in sorted(counts.items()):
                g.add_metric([str(level)], float(n))
            yield g
        yield gauge("kv_cache_usage_perc", "Fraction of KV cache blocks in use (0..1)", s.kv_cache_usage)
        yield gauge("num_total_blocks", "KV cache blocks", s.num_total_blocks)
        yield gauge("num_free_blocks", "Free KV cache blocks", s.num_free_blocks)
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache", s.prefix_cache_queries)
        yield counter("prefix_cache_hits", "Prompt tokens served from the prefix cache", s.prefix_cache_hits)
        rate = s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries else 0.0
        yield gauge("prefix_cache_hit_rate", "prefix_cache_hits / prefix_cache_queries since start", rate)
        yield counter("prompt_tokens", "Prefilled prompt tokens", s.num_prompt_tokens_total)
        yield counter("generation_tokens", "Generated tokens", s.num_generation_tokens_total)
        yield counter("num_preemptions", "Preempted sequences", s.num_preemptions_total)
        yield gauge("prefill_throughput_tokens_per_second", "Recent prefill throughput", s.prefill_throughput)
        yield gauge("decode_throughput_tokens_per_second", "Recent decode throughput", s.decode_throughput)
        yield counter("spec_decode_num_draft_tokens", "Speculative draft tokens proposed", s.spec_num_draft_tokens)
        yield counter("spec_decode_num_accepted_tokens", "Speculative draft tokens accepted",
                      s.spec_num_accepted_tokens)
        yield counter("spec_decode_num_emitted_tokens", "Tokens made by speculative verification steps",
                      s.spec_num_emitted_tokens)
        yield gauge("spec_decode_draft_acceptance_rate", "Accepted / proposed draft tokens since start",
                    s.spec_num_accepted_tokens / s.spec_num_draft_tokens if s.spec_num_draft_tokens else 0.0)
        yield gauge("spec_decode_tokens_per_step", "Tokens per verification step of a sequence since start "
                    "(1 = no gain)", s.spec_num_emitted_tokens / s.spec_num_verify_steps if s.spec_num_verify_steps
                    else 0.0)
        yield counter("engine_faults", "Engine steps that raised (retried without the requests that caused it)",
                      s.num_engine_faults_total)
        yield counter("engine_isolated_requests", "Requests failed alone because a step raised with them in it",
                      s.num_isolated_requests_total)
        yield counter("engine_restarts", "Engine-loop restarts after an internal error", s.num_engine_restarts_total)
        yield gauge("is_sleeping", "1 while the engine sleeps", int(self.engine.is_sleeping))
        in_flight, queued, sessions = self.server_gauges()
        yield gauge("api_requests_in_flight", "HTTP generation requests admitted", in_flight)
        yield gauge("api_requests_queued", "HTTP generation requests waiting for admission", queued)
        yield gauge("num_sessions", "Interactive sessions kept on the server", sessions)


class ServerMetrics:
    def __init__(self, engine, server_gauges: ServerGauges):
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_EngineCollector(engine, server_gauges))
        r = self.registry
        self.ttft = Histogram("lmserve:time_to_first_token_seconds", "Arrival to first output token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("lmserve:time_per_output_token_seconds", "Mean time per output token after the first",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("lmserve:e2e_request_latency_seconds", "Arrival to finish",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("lmserve:request_queue_time_seconds", "Arrival to first scheduled",
                               buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Histogram("lmserve:request_prompt_tokens", "Prompt tokens per request",
                                       buckets=_TOKEN_BUCKETS, registry=r)
        self.generation_tokens = Histogram("lmserve:request_generation_tokens", "Generated tokens per request",
                                           buckets=_TOKEN_BUCKETS, registry=r)
        self.success = Counter("lmserve:request_success", "Finished completions by finish reason",
                               ["finished_reason"], registry=r)
        self.rejected = Counter("lmserve:api_requests_rejected", "Requests refused with 429 (queue full)",
                                registry=r)
        for reason in ("stop", "length", "abort"):
            self.success.labels(reason)

    def observe_finished(self, out: RequestOutput) -> None:
        for o in out.outputs:
            reason = o.finish_reason.value if o.finish_reason is not None else "abort"
            self.success.labels(reason).inc()
        num_generated = sum(len(o.token_ids) for o in out.outputs)
        self.prompt_tokens.observe(len(out.prompt_token_ids))
        self.generation_tokens.observe(num_generated)
        m = out.metrics
        if m is None:
            return
        if m.first_scheduled_time is not None:
            self.queue.observe(max(0.0, m.first_scheduled_time - m.arrival_time))
        if m.first_token_time is not None:
            self.ttft.observe(max(0.0, m.first_token_time - m.arrival_time))
            per_seq = num_generated / max(1, len(out.outputs))
            if m.finished_time is not None and per_seq > 1:
                self.tpot.observe(max(0.0, m.finished_time - m.first_token_time) / (per_seq - 1))
        if m.finished_time is not None:
            self.e2e.observe(max(0.0, m.finished_time - m.arrival_time))

    def observe_aborted(self) -> None:
        self.success.labels("abort").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
