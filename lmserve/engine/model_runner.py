"""ModelRunner: owns the model and the KV cache tensors; turns a SchedulerOutput into tensors, runs the model,
samples. Everything device- or tensor-shaped in the engine happens here."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import torch
import torch.distributed

from lmserve.config import CacheConfig, ModelConfig, cpu_bf16_feature
from lmserve.engine import weights
from lmserve.engine.attention_metadata import build_attention_metadata
from lmserve.engine.cpu_heap import keep_freed_buffers, small_pages
from lmserve.engine.cpu_threads import default_threads
from lmserve.engine.mm_items import image_spans
from lmserve.engine.mm_runner import mm_embeddings, mm_slices
from lmserve.engine.mrope import mrope_positions
from lmserve.engine.sampler import Sampler, SamplingMetadata, compute_logprobs
from lmserve.engine.scheduler import SchedulerOutput
from lmserve.engine.spec_decode import VerifyResult, verify
from lmserve import ops
from lmserve.ops import cpu_kernels
from lmserve.ops.linear import int8_activations
from lmserve.model.arch_config import ArchConfig
from lmserve.model.loader import is_gguf, load_arch_config
from lmserve.model.fused_decode import FusedDecode, attach_moe_kernels
from lmserve.model.lora import lora_step
from lmserve.model.parallel import num_local_kv_heads, validate_tp
from lmserve.model.repack_cache import repack_cache_dir
from lmserve.outputs import TokenLogprob
from lmserve.startup import phase

logger = logging.getLogger(__name__)

@dataclass
class RunnerOutput:
    sampled_token_ids: dict[int, int] = field(default_factory=dict)          # seq_id -> token
    verified: dict[int, VerifyResult] = field(default_factory=dict)          # seq_id -> speculative step's tokens
    logprobs: dict[int, TokenLogprob] = field(default_factory=dict)          # seq_id -> sampled token's logprobs
    prompt_logprobs: dict[int, list[TokenLogprob]] = field(default_factory=dict)  # seq_id -> new prompt entries
    pooled: dict[int, torch.Tensor] = field(default_factory=dict)            # seq_id -> sum of hidden states


@dataclass
class StepBatch:
    """One forward pass's input as plain ints: what every tensor-parallel rank needs (engine/executor.py sends it)."""
    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    mrope: list[list[int]] | None = None    # M-RoPE models: [t, h, w] position streams instead (engine/mrope.py)
    slot_mapping: list[int] = field(default_factory=list)
    decode_rows: list[int] = field(default_factory=list)          # rows of single-token (decode) sequences
    decode_ctx: list[int] = field(default_factory=list)           # their context lengths
    decode_tables: list[list[int]] = field(default_factory=list)  # their block tables
    prefill: list[tuple[int, int, int, list[int]]] = field(default_factory=list)  # (row, n, start, block table)
    logit_rows: list[int] = field(default_factory=list)           # rows whose logits are needed
    mm: list = field(default_factory=list)    # image-token rows (engine/mm_runner.py); rank 0 only (no tp yet)
    # (LoraRequest, first row, rows) per sequence with an adapter: not plain ints, but LoRA needs --tp 1
    lora_rows: list = field(default_factory=list)
    # per `prefill` entry, the (first, end) positions of its bidirectional images (Gemma 3); not on the tp wire
    image_spans: list[list[tuple[int, int]]] = field(default_factory=list)


@dataclass
class StepPlan:
    """The driver's side of a step: which logits rows belong to which sequence."""
    samplers: list = field(default_factory=list)     # (seq, logits row)
    prompt_lp: list = field(default_factory=list)    # (seq, first logits row, first position, count)
    pool: list = field(default_factory=list)         # (seq, start row, count)
    verifiers: list = field(default_factory=list)    # (seq, first logits row, draft tokens)


class ModelRunner:
    is_encoder = False
    lora = None        # engine/lora_manager.LoraManager when adapters are served (set by the executor)

    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, model_path: str,
                 max_num_seqs: int, max_model_len: int | None = None, tp_rank: int = 0, tp_size: int = 1,
                 device: torch.device | None = None):
        """tp_rank / tp_size: this process's tensor-parallel shard (the process group is set up by the executor);
        device: overrides the config's (one GPU per rank)."""
        self.model_config = model_config
        self.cache_config = cache_config
        self.model_path = model_path
        self.device = device or model_config.torch_device
        self.tp_rank, self.tp_size = tp_rank, tp_size
        if model_config.num_threads:
            torch.set_num_threads(model_config.num_threads)
        elif self.device.type == "cpu":
            # NOTE: torch counts the host's cores; a cgroup quota, an affinity mask or SMT siblings may mean fewer
            threads, why = default_threads()
            torch.set_num_threads(threads)
            logger.info("CPU threads: %d (%s; --num-threads overrides)", threads, why)
        self.dtype = model_config.torch_dtype
        # bfloat16 matmuls also halve the KV cache (decode attention at large batch is bound by reading it)
        self.matmul_precision = model_config.matmul_precision
        self.kv_dtype = torch.bfloat16 if (self.matmul_precision == "bfloat16" and self.dtype == torch.float32) \
            else self.dtype
        # ops.gguf_matmul's activation precision for every quantized layer (--quant-activations)
        self.gguf_int8 = int8_activations(model_config.quant_activations, model_config.dtype)
        if self.device.type == "cuda":
            # NOTE: measured on an H200 (torch 2.11): SDPA's cuDNN backend, first choice on Hopper, builds a new
            # cuDNN graph for every new key length, i.e. at every decode step: 3.8 ms of CPU per layer call, 78%
            # of a 1B model's step. Flash / memory-efficient SDPA have no per-shape set-up.
            torch.backends.cuda.enable_cudnn_sdp(False)
        if self.device.type == "cpu":
            logger.info("precision: %s model, %s matmuls, %s KV cache (dtype %s, matmul_dtype %s; CPU bf16: %s)",
                        self.dtype, self.matmul_precision, self.kv_dtype, model_config.dtype,
                        model_config.matmul_dtype, cpu_bf16_feature() or "none")
        arch = load_arch_config(model_path)
        validate_tp(arch, tp_size)
        self.arch: ArchConfig = dataclasses.replace(arch, tp_rank=tp_rank, tp_size=tp_size)
        self.block_size = cache_config.block_size
        self.max_model_len = min(max_model_len or self.arch.max_position_embeddings,
                                 self.arch.max_position_embeddings)
        self.max_num_seqs = max_num_seqs
        self.sampler = Sampler()
        self.ops = self._select_ops()
        self.kernel = self.ops.lib     # the compiled CPU kernel module in use; None = PyTorch references only
        self.quantized = weights.keeps_quantized(model_config, model_path, self.ops, self.arch)
        weights.check_fits(model_path, self.quantized, self.dtype)
        with phase(logger, "loading weights", ticker=not is_gguf(model_path)) as done:
            self.reload_model()
            num_params = sum(p.numel() for p in self.model.parameters())
            form = "in the file's own format" if self.quantized else self.dtype
            done["done"] = f"{num_params / 1e6:.0f}M parameters, {form} on {self.device}"
        self.weight_memory = weights.weight_memory(self.model, model_path)
        weights.log_weight_memory(self.weight_memory)
        self.num_blocks = self._decide_num_blocks()
        if tp_size > 1:   # every rank must hold the same number of blocks: the smallest one fits all
            n = torch.tensor([self.num_blocks], device=self.device)
            torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MIN)
            self.num_blocks = int(n.item())
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        with phase(logger, "allocating the KV cache"):
            self.allocate_kv_cache()
        if self.device.type == "cpu":
            # after loading: the weights' and KV pool's own allocations keep glibc's defaults (no load-time holes
            # left in the heap); from here a prefill's large activations reuse heap pages (engine/cpu_heap.py)
            keep_freed_buffers()

    # ---- set-up ---------------------------------------------------------------------------------------
    def _select_ops(self) -> ops.OpTable:
        """Which implementation each op uses for this model: decided once, here (lmserve/ops)."""
        mc = self.model_config
        backend = mc.attention_backend
        cpp_possible = mc.kernels == "auto" and self.device.type == "cpu" and self.dtype == torch.float32
        if backend == "cpp" and not cpp_possible:
            raise ValueError("attention_backend (--kernels cpp): the C++ kernels need device cpu and dtype float32")
        # attention_backend="torch" keeps its meaning: no C++ kernel at all (kernels="torch" also drops packed GEMMs)
        kernels = "torch" if backend == "torch" else mc.kernels
        lib = cpu_kernels.load(mc.kernel_build_timeout) if kernels == "auto" and cpp_possible else None
        table = ops.select(self.device, self.dtype, kernels, lib=lib)
        if table.lib is None and backend == "cpp":
            raise RuntimeError("attention_backend (--kernels cpp): the C++ CPU kernels failed to build")
        kernel_ops = sorted(name for name, arm in table.arms.items() if arm != "native")
        logger.info("ops: %s kernels for %s; PyTorch references for the rest",
                    "no" if not kernel_ops else "C++", ", ".join(kernel_ops) or "none")
        return table

    def reload_model(self) -> None:
        """Build the model and load its weights (again after a level-2 sleep dropped them)."""
        self.model = weights.build_model(self.arch, self.device, self.dtype, self.quantized)
        with ops.use(self.ops):     # the kernels repack weights at load
            weights.load_model_weights(self.model, self.model_path, self.arch, self.dtype, self.quantized,
                                       int8=getattr(self, "gguf_int8", False),   # --quant-activations (issue 20 B)
                                       repack=self.model_config.gguf_repack == "auto",
                                       repack_cache=repack_cache_dir(self.model_config.gguf_repack_cache))
        self._attach_fast()
        # decode steps' layers in one kernel call where the model and the op table allow (model/fused_decode.py)
        self.fused = FusedDecode.build(self.model, self.ops) if self.device.type == "cpu" else None
        if self.device.type == "cpu":      # MoE blocks of the other steps in one kernel call each
            attach_moe_kernels(self.model, self.ops)

    def _attach_fast(self) -> None:
        """Packed / lower-precision copies of float weights for GEMMs (GGUF layers keep their blocks)."""
        if self.dtype == torch.float32:
            weights.attach_fast_copies(self.model, self.matmul_precision, pack=self.model_config.kernels != "torch")

    def update_weights(self, new: dict[str, torch.Tensor]) -> None:
        if self.quantized:
            raise ValueError("weights: updating weights needs float weights; start the server with --weights float")
        self.model.load_weights(new)                 # all-or-nothing
        weights.unpack_float_layers(self.model)      # the packed copies are stale now
        self._attach_fast()

    def _kv_block_bytes(self) -> int:
        a = self.arch
        elem = torch.tensor([], dtype=self.kv_dtype).element_size()
        return 2 * a.num_hidden_layers * self.block_size * num_local_kv_heads(a) * a.head_dim * elem

    def _decide_num_blocks(self) -> int:
        cc = self.cache_config
        # never more than every sequence at full length could use
        max_useful = self.max_num_seqs * -(-self.max_model_len // self.block_size) + 1
        if cc.num_blocks is not None:
            return cc.num_blocks
        if self.device.type == "cuda":
            budget = int(torch.cuda.mem_get_info(self.device)[0] * (cc.cache_max_entry_count or 0.8))
            budget = cc.kv_cache_memory or budget
            why = "--kv-cache-memory" if cc.kv_cache_memory else "a fraction of free device memory"
        else:
            budget, why = weights.kv_cache_budget(cc, self.weight_memory, self._kv_block_bytes())
        num = budget // self._kv_block_bytes()
        if num < 2:
            raise MemoryError(f"not enough memory for the KV cache: {budget / 2**20:.1f} MiB ({why}) is less than "
                              f"2 blocks of {self._kv_block_bytes() / 2**20:.2f} MiB")
        if num > max_useful:
            logger.info("KV cache: %s gives %d blocks; %d suffice for --max-batch-size x --session-len", why,
                        num, max_useful)
        return min(num, max_useful)

    def allocate_kv_cache(self) -> None:
        a = self.arch
        shape = (self.num_blocks * self.block_size, num_local_kv_heads(a), a.head_dim)   # this rank's heads
        self.kv_caches = []
        for _ in range(a.num_hidden_layers):
            # NOTE: empty, not zeros: pages are touched only when used. Only the null block must be zero,
            # because padded gathers read it and 0-weight * NaN garbage would still be NaN.
            k, v = torch.empty(shape, dtype=self.kv_dtype, device=self.device), \
                torch.empty(shape, dtype=self.kv_dtype, device=self.device)
            for t in (k, v):      # RSS grows by the blocks used, not 2 MB per tensor (cpu_heap.py)
                small_pages(t)
            k[:self.block_size].zero_()
            v[:self.block_size].zero_()
            self.kv_caches.append((k, v))
        logger.info("KV cache: %d blocks of %d tokens, %s (%.1f MiB)", self.num_blocks, self.block_size,
                    self.kv_dtype, self.num_blocks * self._kv_block_bytes() / 2**20)

    def free_kv_cache(self) -> None:
        self.kv_caches = []

    # ---- one step ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        batch, plan = self.prepare(sched)
        hidden, logits = self.forward(batch)
        return self.sample(plan, hidden, logits)

    def prepare(self, sched: SchedulerOutput) -> tuple[StepBatch, StepPlan]:
        """SchedulerOutput -> the forward pass's plain-int input (the same on every tensor-parallel rank) and
        the driver's per-sequence bookkeeping for sampling."""
        b, plan = StepBatch(), StepPlan()
        if getattr(self.model, "uses_mrope", False):
            b.mrope = [[], [], []]
        bs = self.block_size
        for s in sched.scheduled:
            seq, n = s.seq, s.num_new_tokens
            start, row = seq.num_computed_tokens, len(b.input_ids)
            draft = s.spec_token_ids
            b.input_ids.extend(seq.token_ids[start:start + n - len(draft)])
            b.input_ids.extend(draft)
            b.positions.extend(range(start, start + n))
            if b.mrope is not None:
                for stream, pos in zip(b.mrope, mrope_positions(seq, start, n)):
                    stream.extend(pos)
            if seq.params.lora is not None:
                b.lora_rows.append((seq.params.lora, row, n))
            bt = seq.block_table
            b.slot_mapping.extend(bt[p // bs] * bs + p % bs for p in range(start, start + n))
            if seq.mm_items:
                b.mm.extend(mm_slices(seq, start, n, row))
            if n == 1 or draft:
                # NOTE: a speculative step's rows are decode queries of growing context: row i attends to the
                # positions up to start + i, whose K/V this forward writes before attention (the decode kernel, so
                # verification reads the cache exactly as plain decoding would)
                b.decode_rows.extend(range(row, row + n))
                b.decode_ctx.extend(range(start + 1, start + n + 1))
                b.decode_tables.extend([bt] * n)
            else:
                b.prefill.append((row, n, start, bt))
                b.image_spans.append(image_spans(seq, start, n) if seq.mm_items else [])
            if seq.pooling:
                plan.pool.append((seq, row, n))
                continue
            if seq.wants_prompt_logprobs:
                # logits at position p score prompt token p + 1
                last_scored = min(start + n, seq.num_prompt_tokens - 1)
                if last_scored > start:
                    plan.prompt_lp.append((seq, len(b.logit_rows), start, last_scored - start))
                    b.logit_rows.extend(range(row, row + last_scored - start))
            if draft:
                plan.verifiers.append((seq, len(b.logit_rows), draft))
                b.logit_rows.extend(range(row + n - 1 - len(draft), row + n))
            elif s.samples:
                plan.samplers.append((seq, len(b.logit_rows)))
                b.logit_rows.append(row + n - 1)
        return b, plan

    @torch.inference_mode()
    def forward(self, b: StepBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> final hidden states [num_tokens, hidden], logits [len(logit_rows), vocab] fp32 (None if no rows).
        Every tensor-parallel rank runs this on the same batch (its collectives must match)."""
        dev = self.device
        ids_t = torch.tensor(b.input_ids, dtype=torch.long, device=dev)
        pos_t = torch.tensor(b.positions if b.mrope is None else b.mrope, dtype=torch.long, device=dev)
        meta = build_attention_metadata(self.arch, self.block_size, dev, b.slot_mapping, b.decode_rows,
                                        b.decode_ctx, b.decode_tables, b.prefill, len(b.input_ids),
                                        b.image_spans)
        groups = self.lora.groups(b.lora_rows, dev) if self.lora is not None and b.lora_rows else []
        with ops.use(self.ops), lora_step(groups):
            if self.fused is not None and self.lora is None and not b.mm and FusedDecode.applies(meta):
                hidden = self.fused(ids_t, pos_t, meta, self.kv_caches)
            else:
                hidden = self.model(ids_t, pos_t, meta, self.kv_caches,      # [num_tokens, hidden]
                                    **mm_embeddings(self.model, b.mm, dev))
            logits = self.model.compute_logits(hidden[b.logit_rows]) if b.logit_rows else None
        return hidden, logits

    @torch.inference_mode()
    def sample(self, plan: StepPlan, hidden: torch.Tensor, logits: torch.Tensor | None) -> RunnerOutput:
        out = RunnerOutput()
        dev = self.device
        for seq, row, n in plan.pool:
            out.pooled[seq.seq_id] = hidden[row:row + n].float().sum(0)
        if logits is None:
            return out
        for seq, first, start, count in plan.prompt_lp:
            targets = torch.tensor(seq.token_ids[start + 1:start + 1 + count], device=dev)
            out.prompt_logprobs[seq.seq_id] = compute_logprobs(logits[first:first + count], targets,
                                                               seq.params.prompt_logprobs)
        for seq, first, draft in plan.verifiers:
            out.verified[seq.seq_id] = verify(logits[first:first + len(draft) + 1], draft, seq)
        if plan.samplers:
            seqs = [seq for seq, _ in plan.samplers]
            idx = [r for _, r in plan.samplers]
            # NOTE: a list index copies through the advanced-indexing kernel: 0.2-0.6 ms for one 262k-wide row
            # (Gemma 3's vocabulary); a slice is a view (the sampler may edit it: nothing reads logits after)
            rows = logits[idx[0]:idx[-1] + 1] if idx == list(range(idx[0], idx[0] + len(idx))) else \
                logits.index_select(0, torch.tensor(idx, device=dev))
            metadata = SamplingMetadata.from_sequences(seqs, rows.shape[-1], dev)
            result = self.sampler(rows, metadata)
            for i, seq in enumerate(seqs):
                out.sampled_token_ids[seq.seq_id] = result.sampled_token_ids[i]
                if result.logprobs is not None and result.logprobs[i] is not None:
                    out.logprobs[seq.seq_id] = result.logprobs[i]
        return out

    def pooled_embedding(self, pooled_sum: torch.Tensor, num_tokens: int) -> list[float]:
        """A decoder's embedding: the mean of the final hidden states over the prompt (summed step by step, so
        chunked prompts pool the same), L2-normalised."""
        return torch.nn.functional.normalize(pooled_sum / num_tokens, dim=0).tolist()


def sleep_runner(runner, level: int) -> None:
    """Free the KV cache (level 1) and the weights too (level 2)."""
    runner.free_kv_cache()
    if level == 2:
        runner.model = None
        runner.fused = None       # it holds the weights too


def wakeup_runner(runner) -> bool:
    """Rebuild what sleep freed. -> True when the KV cache was reallocated (all blocks free again)."""
    realloc = not runner.kv_caches
    if runner.model is None:
        runner.reload_model()
    if realloc:
        runner.allocate_kv_cache()
    return realloc
