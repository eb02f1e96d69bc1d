"""LLMEngine: add_request / abort / step. Single-threaded; AsyncEngine drives it from a background thread."""
from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass, field

import torch

from lmserve.config import EngineConfig
from lmserve.engine.block_manager import BlockManager
from lmserve.engine.detokenizer import IncrementalDetokenizer
from lmserve.engine.executor import make_executor
from lmserve.engine.fault import (FaultInjector, FaultStats, RequestFailedError, drop_failed,
                                  execute_isolated)
from lmserve.engine.guided import GrammarCache
from lmserve.engine.mm_inputs import MMPrompt, load_image_processor, process_images
from lmserve.engine.priority import count_by_priority
from lmserve.engine.request_checks import RequestLimits, check_request
from lmserve.engine.scheduler import Scheduler
from lmserve.engine.sequence import Sequence
from lmserve.engine.spec_decode import SpecDecoder, check_supported
from lmserve.engine.weights import memory_stats
from lmserve.generation_config import describe as describe_generation_defaults
from lmserve.generation_config import load_generation_defaults
from lmserve.model.gguf import release_readers
from lmserve.model.loader import resolve_model_path
from lmserve.model.registry import is_encoder, resolve_task
from lmserve.outputs import (CompletionOutput, EmbeddingOutput, FinishReason, RequestMetrics, RequestOutput)
from lmserve.sampling_params import SamplingParams
from lmserve.startup import phase, trim_heap
from lmserve.tokenizer import CHATML_TEMPLATE, load_tokenizer

logger = logging.getLogger(__name__)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_total_blocks: int
    num_free_blocks: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_prompt_tokens_total: int
    num_generation_tokens_total: int
    num_preemptions_total: int
    prefill_throughput: float
    decode_throughput: float
    # speculative decoding (zeros when off): drafts proposed / accepted, tokens made by verification steps
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_num_emitted_tokens: int = 0
    spec_num_verify_steps: int = 0
    # fault isolation (engine/fault.py)
    num_engine_faults_total: int = 0
    num_isolated_requests_total: int = 0
    num_engine_restarts_total: int = 0
    # bytes by kind: weights_gguf (blocks, mapped), weights_gguf_resident, weights_float, weights_packed, kv_cache,
    # process_rss (engine/weights.py memory_stats)
    memory: dict = field(default_factory=dict)
    # priority level -> sequences (engine/priority.py); one level (0) under fcfs unless requests set priority
    running_by_priority: dict[int, int] = field(default_factory=dict)
    waiting_by_priority: dict[int, int] = field(default_factory=dict)


class _Request:
    __slots__ = ("request_id", "seqs", "prompt_token_ids", "session_id")

    def __init__(self, request_id, seqs, prompt_token_ids, session_id):
        self.request_id, self.seqs, self.prompt_token_ids, self.session_id = \
            request_id, seqs, prompt_token_ids, session_id


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        check_supported(config.speculative)
        self.model_path = resolve_model_path(config.model.model)
        mc = config.model
        # NOTE: read before the weights, so a bad --generation-config path fails in a second, not a minute
        self.generation_defaults, source = load_generation_defaults(self.model_path, mc.generation_config)
        logger.info(describe_generation_defaults(self.generation_defaults, source))
        self.task = resolve_task(mc.task, self.model_path)
        # NOTE: encoders have no chat template and need none (only /v1/encode's do_preprocess renders one): no
        # warning about falling back to ChatML
        template = mc.chat_template or (CHATML_TEMPLATE if is_encoder(self.model_path) else None)
        with phase(logger, "loading the tokenizer"):
            self.tokenizer = load_tokenizer(self.model_path, mc.tokenizer, template)
        # NOTE: before the weights: parsing a large vocabulary frees ~100 MiB in small pieces, which the loader's
        # long-lived allocations would otherwise be scattered through, leaving them untrimmable
        trim_heap()
        self.executor = make_executor(config, self.model_path)
        self.block_manager = BlockManager(self.runner.num_blocks, config.cache.block_size,
                                          config.cache.enable_prefix_caching)
        sched = config.scheduler
        if self.runner.is_encoder:   # prefill priority protects decodes, and encoders have none: keep the plain cap
            sched = dataclasses.replace(sched, max_burst_batched_tokens=sched.max_num_batched_tokens)
        self.scheduler = Scheduler(sched, self.block_manager)
        self.scheduler.on_finish = self._on_finish
        self.spec = None
        if config.speculative.method is not None and not self.runner.is_encoder:
            self.spec = SpecDecoder(config.speculative, self.block_manager, config.scheduler.max_num_batched_tokens)
        self.scheduler.spec = self.spec
        # NOTE: a sequence longer than the whole cache could never be scheduled; cap the session length there.
        capacity = self.block_manager.num_usable_blocks * config.cache.block_size
        self.max_model_len = min(self.runner.max_model_len, capacity)
        if self.max_model_len < self.runner.max_model_len:
            logger.warning("session length capped at %d tokens by the KV cache size", self.max_model_len)
        if self.runner.is_encoder and config.scheduler.max_num_batched_tokens < self.max_model_len:
            # a whole input is computed in one step, so it must fit the step's token budget
            self.max_model_len = config.scheduler.max_num_batched_tokens
            logger.warning("encoder inputs capped at %d tokens by the step's token budget (--max-prefill-token-num)",
                           self.max_model_len)
        self.vocab_size = self.runner.arch.vocab_size
        self.images = load_image_processor(self.model_path, self.runner.arch)   # VLMs' HF processor, or None
        self.modalities = ("text",) if self.images is None else ("text", "image")
        self.image_placeholder = None if self.images is None else self.images.image_placeholder
        self.limits = RequestLimits(self.task, self.vocab_size, self.max_model_len)
        if self.task == "score":    # BERT cross-encoders tell a pair's two texts apart after the first [SEP]
            self.runner.sep_token_id = self.tokenizer.hf.sep_token_id
        # `dimensions` of an embedding request: None = not allowed, () = any size, else these sizes
        self.embedding_dimensions = self.runner.pooling.matryoshka_dimensions if self.runner.is_encoder else None
        self.embedding_size = self.runner.arch.hidden_size
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids) | frozenset(self.runner.arch.eos_token_ids)
        self.grammars = GrammarCache(self.tokenizer.hf, self.vocab_size, self.eos_token_ids)
        self.requests: dict[str, _Request] = {}
        self.sessions: dict[int, list[int]] = {}     # session_id -> pinned block ids
        self.on_finish = None    # called with a sequence before its blocks are freed (engine/disagg.py pins them)
        self._seq_ids = itertools.count()
        self._window: list[tuple[float, int, int]] = []   # (time, prefill tokens, decode tokens) per step
        self.fault_stats = FaultStats()
        if config.fault_injection:      # test-only (engine/fault.py)
            FaultInjector(self, config.fault_injection)
        release_readers()     # start-up's parsed GGUF metadata (model/gguf.py)
        trim_heap()

    @property
    def runner(self):
        """This process's ModelRunner (rank 0's shard under tensor parallelism)."""
        return self.executor.runner

    def shutdown(self) -> None:
        self.executor.shutdown()

    @classmethod
    def from_config(cls, config: EngineConfig | None = None, **kwargs) -> "LLMEngine":
        return cls(config or EngineConfig(**kwargs))

    # ---- requests ---------------------------------------------------------------------------------------
    def check_request(self, prompt: str | list[int], params: SamplingParams | None) -> list[int]:
        """Tokenize and run every input check once (engine/request_checks.py; pure, safe from any thread).
        -> prompt token ids. Raises InvalidRequestError (SamplingParamsError is one)."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        check_request(self.limits, ids, params)
        return ids

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    session_id: int | None = None, arrival_time: float | None = None,
                    images: list | None = None) -> None:
        """Check, then queue (the offline path; AsyncEngine checks on the caller's thread and calls enqueue).
        images: PIL images in prompt order, each written as `image_placeholder` in the prompt (engine/mm_inputs.py)."""
        mm = process_images(self.images, prompt, images)
        ids = self.check_request(prompt if mm is None else mm.token_ids, params)
        self.enqueue_request(request_id, ids, params, session_id, arrival_time, mm=mm)

    def enqueue_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                        session_id: int | None = None, arrival_time: float | None = None,
                        mm: MMPrompt | None = None) -> None:
        """Queue a request whose input check_request accepted (mm: its processed images, whose ids these are)."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        ids = prompt_token_ids
        seqs = []
        for i in range(params.n):
            seq = Sequence(next(self._seq_ids), request_id, ids, params, index=i, arrival_time=arrival_time,
                           eos_token_ids=self.eos_token_ids, max_model_len=self.max_model_len)
            if params.seed is not None:
                seq.generator = torch.Generator(device=self.runner.device).manual_seed(params.seed + i)
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, ids, params)
            if params.guided is not None:
                # compiled already (AsyncEngine compiles off this thread); here it is a cache hit
                seq.guided = self.grammars.new_state(params.guided)
            seq.session_id = session_id if params.n == 1 else None
            seq.mm_items = [] if mm is None else mm.items
            if i > 0 and self.block_manager.enable_prefix_caching and params.prompt_logprobs is None:
                seq.wait_for = seqs[0]
            seqs.append(seq)
        self.requests[request_id] = _Request(request_id, seqs, ids, session_id)
        for seq in seqs:
            self.scheduler.add(seq)

    def add_pooling_request(self, request_id: str, prompt_token_ids: list[int]) -> None:
        self.enqueue_pooling_request(request_id, self.check_request(prompt_token_ids, None))

    def enqueue_pooling_request(self, request_id: str, prompt_token_ids: list[int]) -> None:
        """Queue a pooling input that check_request(ids, None) accepted."""
        ids = prompt_token_ids
        seq = Sequence(next(self._seq_ids), request_id, ids, SamplingParams(max_tokens=1))
        seq.pooling = True
        seq.needs_whole_prompt = self.runner.is_encoder
        self.requests[request_id] = _Request(request_id, [seq], ids, None)
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, FinishReason.ABORT)
        return None if req.seqs[0].pooling else self._make_output(req)

    def end_session(self, session_id: int) -> bool:
        blocks = self.sessions.pop(session_id, None)
        if blocks is None:
            return False
        self.block_manager.release(blocks)
        return True

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- the step ---------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput | EmbeddingOutput | RequestFailedError]:
        """schedule -> execute -> update -> emit."""
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        if self.spec is not None:
            self.spec.propose(sched)
        # NOTE: a step that raises is retried without the requests that make it fail; those come back as errors
        runner_output, failed = execute_isolated(self, sched)
        errors = drop_failed(self, sched, failed)
        update = self.scheduler.update_from_output(sched, runner_output)
        self._record_throughput(update.num_prefill_tokens, update.num_decode_tokens)
        return errors + self._emit(update.seqs)

    def _emit(self, seqs: list[Sequence]) -> list[RequestOutput | EmbeddingOutput]:
        """One cumulative output per request with news this step; finished requests leave the engine."""
        outputs = []
        for rid in dict.fromkeys(seq.request_id for seq in seqs):
            req = self.requests[rid]
            outputs.append(self._make_embedding(req) if req.seqs[0].pooling else self._make_output(req))
            if all(seq.is_finished for seq in req.seqs):
                del self.requests[rid]
        return outputs

    def _on_finish(self, seq: Sequence) -> None:
        if seq.session_id is not None and self.block_manager.enable_prefix_caching:
            # keep this turn's full blocks pinned so the session's next turn hits them in the prefix cache
            full = seq.block_table[:seq.num_computed_tokens // self.block_manager.block_size]
            self.block_manager.share(full)
            self.end_session(seq.session_id)
            self.sessions[seq.session_id] = full
        if self.on_finish is not None:
            self.on_finish(seq)

    def _make_output(self, req: _Request) -> RequestOutput:
        seq0 = req.seqs[0]
        outs = [CompletionOutput(index=seq.index, text=seq.detokenizer.output_text,
                                 token_ids=list(seq.output_token_ids),
                                 logprobs=None if seq.logprobs is None else list(seq.logprobs),
                                 finish_reason=seq.finish_reason if seq.is_finished else None,
                                 stop_reason=seq.stop_reason) for seq in req.seqs]
        finished = all(seq.is_finished for seq in req.seqs)
        metrics = RequestMetrics(seq0.arrival_time, seq0.first_scheduled_time, seq0.first_token_time,
                                 max((s.finished_time or 0 for s in req.seqs), default=None) if finished else None)
        return RequestOutput(req.request_id, req.prompt_token_ids, outs, finished,
                             prompt_logprobs=None if seq0.prompt_logprobs is None else list(seq0.prompt_logprobs),
                             num_cached_tokens=seq0.num_cached_tokens, metrics=metrics)

    def _make_embedding(self, req: _Request) -> EmbeddingOutput:
        seq = req.seqs[0]
        return EmbeddingOutput(req.request_id, req.prompt_token_ids,
                               self.runner.pooled_embedding(seq.pooled_sum, seq.num_prompt_tokens))

    def _record_throughput(self, num_prefill: int, num_decode: int) -> None:
        now = time.monotonic()
        self._window.append((now, num_prefill, num_decode))
        while self._window and self._window[0][0] < now - 10:
            self._window.pop(0)

    # ---- stats and control ------------------------------------------------------------------------------
    def get_stats(self, memory: bool = True) -> EngineStats:
        """memory=False leaves EngineStats.memory empty: reading the mapped weights' residency walks
        /proc/self/smaps (10-40 ms for a 1B model), too slow for the async engine's per-step snapshot."""
        bm, sch = self.block_manager, self.scheduler
        span = max(1e-6, (self._window[-1][0] - self._window[0][0]) if len(self._window) > 1 else 1.0)
        return EngineStats(
            num_running=len(sch.running), num_waiting=len(sch.waiting),
            num_total_blocks=bm.num_usable_blocks, num_free_blocks=bm.num_free_blocks, kv_cache_usage=bm.usage,
            prefix_cache_queries=bm.prefix_cache_queries, prefix_cache_hits=bm.prefix_cache_hits,
            num_prompt_tokens_total=sch.num_prompt_tokens_total,
            num_generation_tokens_total=sch.num_generation_tokens_total,
            num_preemptions_total=sch.num_preemptions_total, num_engine_faults_total=self.fault_stats.num_faults,
            num_isolated_requests_total=self.fault_stats.num_isolated,
            num_engine_restarts_total=self.fault_stats.num_restarts,
            prefill_throughput=sum(w[1] for w in self._window) / span,
            decode_throughput=sum(w[2] for w in self._window) / span,
            memory=memory_stats(self.runner) if memory else {},
            running_by_priority=count_by_priority(sch.running), waiting_by_priority=count_by_priority(sch.waiting),
            **self._spec_stats())

    def _spec_stats(self) -> dict[str, int]:
        sp = self.spec
        if sp is None:
            return {}
        return dict(spec_num_draft_tokens=sp.num_draft_tokens, spec_num_accepted_tokens=sp.num_accepted_tokens,
                    spec_num_emitted_tokens=sp.num_emitted_tokens, spec_num_verify_steps=sp.num_verify_steps)

    def abort_all(self) -> list[RequestOutput]:
        return [o for rid in list(self.requests) if (o := self.abort(rid)) is not None]

    # ---- offline API ----------------------------------------------------------------------------------------
    def generate(self, prompts: list[str] | list[list[int]] | str,
                 params: SamplingParams | list[SamplingParams] | None = None,
                 images: list | None = None) -> list[RequestOutput]:
        """images: one list of PIL images per prompt (one list for a single prompt)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
            images = None if images is None else [images]
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        ids = [f"offline-{next(self._seq_ids)}" for _ in prompts]
        for i, (rid, prompt, p) in enumerate(zip(ids, prompts, params_list)):
            self.add_request(rid, prompt, p, images=None if images is None else images[i])
        final: dict[str, RequestOutput] = {}
        errors: list[RequestFailedError] = []
        while self.has_unfinished():
            for out in self.step():
                if isinstance(out, RequestFailedError):
                    errors.append(out)
                elif out.finished:
                    final[out.request_id] = out
        if errors:      # the others finished: the engine is clean for the next call
            raise errors[0]
        return [final[rid] for rid in ids]
