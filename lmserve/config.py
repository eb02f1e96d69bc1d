"""Frozen configuration dataclasses. Device and dtype are resolved here, once, for the whole process.

Each component receives only the sub-config it needs. The CLI maps arguments to these in one function
(`cli.build_engine_config`). Environment variables are read there and in a few named places (docs/architecture.md,
"config.py"), never by the config classes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# NOTE: torch is imported inside functions, so the proxy and the clients can import the config and protocol
# modules without paying for (or needing) torch.
_DTYPES = {
    "float32": "float32", "fp32": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}


class TPConfigError(ValueError):
    """The model cannot be split the requested number of ways (model/parallel.py validate_tp)."""


def resolve_device(device: str = "auto") -> "torch.device":
    import torch
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' requested but CUDA is not available")
    return dev


@cache
def cpu_bf16_feature() -> str | None:
    """The CPU's native bfloat16 instruction set ("amx_bf16" or "avx512_bf16"), or None where it has none.

    Read at run time: machines of one kind come with different CPUs, and a wheel's build flags say nothing about
    the host. torch's cpuinfo probe first; /proc/cpuinfo flags where torch lacks it. LMSERVE_CPU_ISA below
    avx512 (ops/cpu_isa.py: how an AVX2-only host is simulated on a newer one) means no native bf16 either.
    """
    import torch

    from lmserve.ops import cpu_isa
    levels = list(cpu_isa.LEVELS)
    if levels.index(cpu_isa.isa()) < levels.index("avx512"):
        return None
    probe = getattr(torch, "cpu", None)
    amx, avx = getattr(probe, "_is_amx_tile_supported", None), getattr(probe, "_is_avx512_bf16_supported", None)
    if amx is not None and avx is not None:
        return "amx_bf16" if amx() else "avx512_bf16" if avx() else None
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return None
    return "amx_bf16" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags else None


def resolve_dtype(dtype: str, device: "torch.device") -> "torch.dtype":
    import torch
    if dtype == "auto":
        # NOTE: on CPU, activations, norms and sampling stay float32 even in auto mode; only the big matmuls and the
        # KV cache go bfloat16, where the CPU has native bf16 (resolve_matmul_dtype).
        if device.type == "cpu":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: unknown dtype {dtype!r}; choose one of auto, {', '.join(sorted(_DTYPES))}")
    return getattr(torch, _DTYPES[dtype])


def resolve_matmul_dtype(matmul_dtype: str, dtype: str, device: "torch.device") -> str:
    """The precision policy for large matmuls and the KV cache on a float32 CPU model.

    An explicit matmul_dtype wins (the CLI sets it from `--dtype bfloat16` on CPU). Else, with dtype auto,
    bfloat16 (float32 accumulation, bf16 KV cache) on a CPU with native bf16 (AVX512_BF16 or AMX), where it is
    ~2.5x the float32 GEMM rate; float32 everywhere else, where bf16 has no hardware path and runs slower than
    float32. An explicit --dtype float32 is the exact mode.
    """
    if matmul_dtype != "auto":
        return matmul_dtype
    if dtype == "auto" and device.type == "cpu" and cpu_bf16_feature() is not None:
        return "bfloat16"
    return "float32"


@dataclass(frozen=True)
class ModelConfig:
    model: str | None = None           # GGUF file, HF directory, hub id; None = bundled SmolLM2
    tokenizer: str | None = None       # defaults to the model
    dtype: str = "auto"
    device: str = "auto"
    chat_template: str | None = None   # a Jinja template string or a path to a file holding one
    max_model_len: int | None = None   # LMDeploy's session_len; None = the model's context length
    # the C++ kernel library as a whole (attention and every other op it has; engine/model_runner._select_ops):
    # "auto" = use it on CPU/float32 when it builds, else PyTorch; "torch" = none of it (unlike kernels="torch",
    # packed float GEMM weights stay; no flag sets this, tests and benchmarks/precision.py do); "cpp" = require
    # it (the CLI's `--kernels cpp`)
    attention_backend: str = "auto"
    # every op (norms, activations, RoPE, attention, quantized matmul, packed GEMM weights): "auto" = kernels where
    # they apply and build (lmserve/ops), "torch" = the PyTorch references end to end (the test oracle)
    kernels: str = "auto"
    # start-up waits at most this long for the C++ kernels to compile (first start) or for another process that
    # is compiling them; after that it serves on the PyTorch references
    kernel_build_timeout: float = 600.0
    # GGUF files: "quantized" = matrices stay in the file's blocks, memory-mapped (ops/linear_method.py GGUFLinear;
    # memory ~ the file); "float" = dequantized once to float weights (exact float32 matmuls, ~8x the memory);
    # "auto" = quantized where ops.gguf_matmul has a kernel, else float (its PyTorch reference dequantizes the
    # matrix on every call: right, but far too slow to serve with)
    weights: str = "auto"
    num_threads: int | None = None     # torch intra-op threads on CPU; None = torch's default (physical cores)
    # "bfloat16": matmuls too large for the quantized kernel run in bfloat16 (float32 accumulation) on a
    # bfloat16 copy of the weights, and the KV cache is bfloat16; ~2x the float32 GEMM rate on CPUs with
    # AVX512_BF16/AMX. Not bit-exact to float32 (docs/benchmarks.md, "Precision"). "auto": bfloat16 where the CPU
    # has native bf16 and dtype is "auto", else float32 (resolve_matmul_dtype; read `matmul_precision`). The CLI
    # has no flag of its own for it: `--dtype bfloat16` on CPU sets it (cli/engine_args._precision).
    matmul_dtype: str = "auto"
    # GGUF quantized matmuls of decode size: "int8" = activations quantized to int8 per 32 (llama.cpp's integer
    # dot products, not exact), "float" = exact float32 activations, "auto" = int8 where the CPU kernels have an
    # integer dot path unless --dtype float32 was given (ops/linear.py int8_activations)
    quant_activations: str = "auto"
    # GGUF matrices of the 8-row layouts (ops/gguf_x8.py) with int8 activations: "auto" = rewritten at load into groups
    # of 8 rows, the layout the int8 kernels read fastest (same size), "none" = served from the mapped file as they are
    # (model/gguf_weights.py)
    gguf_repack: str = "auto"
    # the directory of the repacked matrices' files, mapped by every process serving the GGUF (model/repack_cache.py):
    # "auto" = $LMSERVE_REPACK_CACHE or ~/.cache/lmserve/repacked, "none" = private memory in each process
    gguf_repack_cache: str = "auto"
    # "generate" (chat/completions; embeddings by mean pooling), "embed" (embeddings only; an encoder checkpoint
    # runs with its own pooling), "score" (a cross-encoder: /rerank and /score) or "auto": "score" for
    # *ForSequenceClassification encoders, "embed" for other encoder checkpoints (BERT family), else "generate"
    task: str = "auto"
    # sampling defaults for fields a request leaves out (vLLM's --generation-config): "auto" = from the model
    # (lmserve/generation_config.py), "none" = the API's own defaults, or a generation_config.json path
    generation_config: str = "auto"

    def __post_init__(self):
        if self.max_model_len is not None and self.max_model_len < 16:
            raise ValueError("max_model_len (session_len) must be >= 16")
        if self.attention_backend not in ("auto", "torch", "cpp"):
            raise ValueError("attention_backend must be one of auto, torch, cpp")
        if self.kernels not in ("auto", "torch"):
            raise ValueError("kernels must be one of auto, torch")
        if self.kernel_build_timeout <= 0:
            raise ValueError("kernel_build_timeout must be > 0 seconds")
        if self.weights not in ("auto", "quantized", "float"):
            raise ValueError("weights must be auto, quantized or float")
        if self.matmul_dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError("matmul_dtype must be auto, float32 or bfloat16")
        if self.quant_activations not in ("auto", "int8", "float"):
            raise ValueError("quant_activations must be one of auto, int8, float")
        if self.gguf_repack not in ("auto", "none"):
            raise ValueError("gguf_repack must be auto or none")
        if not self.gguf_repack_cache:
            raise ValueError("gguf_repack_cache must be auto, none or a directory")
        if self.task not in ("auto", "generate", "embed", "score"):
            raise ValueError("task must be one of auto, generate, embed, score")

    @property
    def torch_device(self) -> "torch.device":
        return resolve_device(self.device)

    @property
    def torch_dtype(self) -> "torch.dtype":
        return resolve_dtype(self.dtype, self.torch_device)

    @property
    def matmul_precision(self) -> str:
        """"float32" or "bfloat16": matmul_dtype with "auto" resolved for this CPU."""
        return resolve_matmul_dtype(self.matmul_dtype, self.dtype, self.torch_device)


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    # LMDeploy semantics: a fraction of free memory (device memory on CUDA, available RAM on CPU) to give to
    # the KV cache. None = 0.8 on CUDA and 0.1 on CPU (CPU RAM is shared with everything else on the host).
    cache_max_entry_count: float | None = None
    num_blocks: int | None = None      # explicit block count; overrides cache_max_entry_count
    kv_cache_memory: int | None = None  # bytes for the KV pool (--kv-cache-memory 2GiB); overrides the fraction
    enable_prefix_caching: bool = True

    def __post_init__(self):
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError("block_size must be a positive power of two")
        if self.cache_max_entry_count is not None and not (0 < self.cache_max_entry_count <= 1):
            raise ValueError("cache_max_entry_count must be in (0, 1]")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError("kv_cache_memory must be > 0 bytes")
        if self.num_blocks is not None and self.num_blocks < 2:
            raise ValueError("num_blocks must be >= 2")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256            # LMDeploy's max_batch_size
    max_num_batched_tokens: int = 512  # token budget per step (chunked prefill); bounds decoders' ITL
    # prefill priority: while prompts wait and at most `burst_max_decodes` sequences are decoding, a step may
    # take up to `max_burst_batched_tokens` (a burst is prefilled in fewer steps; only those few decoders see
    # the longer step). None = 4 x max_num_batched_tokens; equal to it turns the policy off.
    max_burst_batched_tokens: int | None = None
    burst_max_decodes: int = 4
    policy: str = "fcfs"               # fcfs | priority: queue order (engine/priority.py)

    def __post_init__(self):
        if self.policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling policy must be fcfs or priority, got {self.policy!r}")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs (max_batch_size) must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if self.max_burst_batched_tokens is not None and self.max_burst_batched_tokens < self.max_num_batched_tokens:
            raise ValueError("max_burst_batched_tokens must be >= max_num_batched_tokens")
        if self.burst_max_decodes < 0:
            raise ValueError("burst_max_decodes must be >= 0")

    @property
    def burst_budget(self) -> int:
        return self.max_burst_batched_tokens or 4 * self.max_num_batched_tokens


@dataclass(frozen=True)
class DistributedConfig:
    """Where the tensor-parallel ranks meet (torch.distributed rendezvous). With one node the engine spawns its
    workers and picks a free port; several nodes each start `lmserve serve api_server ... --nnodes N --node-rank
    K`, node 0 serving HTTP. `rank` is set when a launcher such as torchrun started one process per rank (env
    RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT, read by the CLI)."""
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None     # None: a free port (one node only)
    rank: int | None = None            # this process is exactly this rank (launcher mode); None: spawn per node

    def __post_init__(self):
        if self.nnodes < 1:
            raise ValueError("nnodes must be >= 1")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank must be in [0, {self.nnodes})")
        if self.master_port is not None and not 0 < self.master_port < 65536:
            raise ValueError("master_port must be in (0, 65536)")
        if (self.nnodes > 1 or self.rank is not None) and self.master_port is None:
            raise ValueError("master_port: several nodes (or launcher ranks) must agree on one; pass --master-port")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding (engine/spec_decode.py). method None = off; "ngram" = prompt lookup, no draft model;
    "draft" = a small draft model (`model`), designed in but not implemented yet."""
    method: str | None = None
    model: str | None = None
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 4         # longest suffix n-gram looked up in the sequence
    prompt_lookup_min: int = 2
    # steps with more decoding sequences than this propose nothing (the batch is compute-bound)
    disable_by_batch_size: int = 8

    def __post_init__(self):
        if self.method not in (None, "ngram", "draft"):
            raise ValueError("speculative_method must be ngram or draft")
        if self.method == "draft" and not self.model:
            raise ValueError("speculative_model: the draft method needs a draft model path")
        if self.num_speculative_tokens < 1:
            raise ValueError("num_speculative_tokens must be >= 1")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError("prompt_lookup_min and prompt_lookup_max must satisfy 1 <= min <= max")
        if self.disable_by_batch_size < 0:
            raise ValueError("speculative_disable_by_batch_size must be >= 0")


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters served on the base model (engine/lora_manager.py)."""
    modules: tuple[tuple[str, str, str | None], ...] = ()   # (name, path, base model name) loaded at start
    max_loras: int = 16                # adapters loaded at once (each is a model in /v1/models)
    max_lora_rank: int = 64
    runtime_updates: bool = False      # POST /v1/load_lora_adapter and /v1/unload_lora_adapter

    def __post_init__(self):
        if self.max_loras < 1 or self.max_lora_rank < 1:
            raise ValueError("max_loras and max_lora_rank must be >= 1")
        if len(self.modules) > self.max_loras:
            raise ValueError(f"lora_modules: {len(self.modules)} adapters are more than --max-loras {self.max_loras}")

    @property
    def enabled(self) -> bool:
        return bool(self.modules) or self.runtime_updates


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    tp: int = 1                        # tensor-parallel ranks (processes), engine/executor.py
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    max_engine_restarts: int = 5       # engine-loop restarts allowed within a minute before it is declared dead
    fault_injection: str | None = None  # TEST ONLY (engine/fault.py): needs LMSERVE_ENABLE_TEST_HOOKS=1

    def __post_init__(self):
        if self.tp < 1:
            raise ValueError("tp must be >= 1")
        if self.max_engine_restarts < 0:
            raise ValueError("max_engine_restarts must be >= 0")
        if self.lora.enabled and self.tp > 1:
            raise ValueError("LoRA adapters are not sharded over tensor-parallel ranks: use --tp 1 with "
                             "--lora-modules / --adapters / --enable-lora-runtime-updates")
        d = self.distributed
        if self.tp % d.nnodes:
            raise ValueError(f"tp: {self.tp} ranks cannot be spread evenly over {d.nnodes} nodes")
        if d.rank is not None and not 0 <= d.rank < self.tp:
            raise ValueError(f"rank {d.rank} is outside the {self.tp} tensor-parallel ranks (WORLD_SIZE must be tp)")

    @property
    def is_driver(self) -> bool:
        """Rank 0 schedules, samples and serves; other ranks only run the model (engine/worker.py)."""
        d = self.distributed
        return d.rank == 0 if d.rank is not None else d.node_rank == 0


@dataclass(frozen=True)
class MediaConfig:
    """Bounds on images in requests (server/media.py, server/media_fetch.py); every one is a flag."""
    limit_images_per_prompt: int = 8          # --limit-mm-per-prompt image=N
    allowed_local_media_path: str | None = None   # file:// URLs only under this directory; None: refused
    allow_remote_media: bool = True           # http(s) image URLs; --no-remote-media turns them off
    fetch_timeout: float = 10.0               # seconds for one remote image, redirects included
    max_redirects: int = 3
    max_image_bytes: int = 20 << 20           # one encoded image (data: URI, file or download)
    max_image_pixels: int = 1 << 26           # width x height (8192 x 8192); decompression bombs get 400

    def __post_init__(self):
        if self.limit_images_per_prompt < 0 or self.max_redirects < 0:
            raise ValueError("limit_images_per_prompt and max_redirects must be >= 0")
        if self.fetch_timeout <= 0 or self.max_image_bytes < 1 or self.max_image_pixels < 1:
            raise ValueError("fetch_timeout, max_image_bytes and max_image_pixels must be > 0")


@dataclass(frozen=True)
class ServerConfig:
    server_name: str = "0.0.0.0"
    server_port: int = 23333
    model_name: str | None = None       # name served in /v1/models; defaults to the model path's stem
    api_keys: tuple[str, ...] = ()
    admin_api_keys: tuple[str, ...] = ()  # control endpoints (server/auth.py); none: loopback callers only
    allow_origins: tuple[str, ...] = ()
    allow_credentials: bool = False
    allow_methods: tuple[str, ...] = ("*",)
    allow_headers: tuple[str, ...] = ("*",)
    max_concurrent_requests: int = 256  # requests in flight in the engine
    max_queued_requests: int = 256      # waiting for admission beyond that; then 429
    proxy_url: str | None = None
    proxy_admin_key: str | None = None  # sent to the proxy's /nodes/add; default: our first admin key
    ssl_keyfile: str | None = None      # TLS (HTTPS) when both files are given
    ssl_certfile: str | None = None
    ssl_ca_certs: str | None = None     # require client certificates signed by this CA (e.g. the proxy's)
    tool_call_parser: str | None = None  # server/tool_parsers; None = picked from the chat template
    reasoning_parser: str | None = None  # server/reasoning_parsers; None = reasoning stays in content
    log_level: str = "INFO"
    # Bounds on one request, checked at the edge before any work is queued (docs/operations.md lists them).
    max_request_body_bytes: int = 16 << 20   # 413 beyond; /update_weights (admin, weights) is exempt
    body_read_timeout: float = 30.0     # seconds to receive a whole request body, else 408 (slow clients)
    keep_alive_timeout: float = 5.0     # seconds an idle keep-alive connection is kept open
    max_n: int = 64                     # n (and best_of): completions per prompt
    max_logprobs: int = 20              # logprobs / top_logprobs
    max_stop_sequences: int = 64        # stop strings, and stop_token_ids
    max_logit_bias: int = 1024          # logit_bias entries
    max_prompts: int = 256              # prompts in one /v1/completions list, inputs in one embeddings list
    max_tool_calls: int = 16            # calls in one message under tool_choice=required (the grammar's bound)
    responses_store_size: int = 1024    # /v1/responses kept for previous_response_id (LRU, in memory)
    # prefill-decode disaggregation (engine/disagg.py): this server's role, and how long a prefill server keeps
    # a finished prompt's KV for its decode server (also a decode server's wait for one KV transfer reply)
    role: str = "hybrid"
    migration_timeout: float = 60.0
    media: MediaConfig = field(default_factory=MediaConfig)   # image inputs on vision-language models

    def __post_init__(self):
        if self.max_concurrent_requests < 1:
            raise ValueError("max_concurrent_requests must be >= 1")
        if self.max_queued_requests < 0:
            raise ValueError("max_queued_requests must be >= 0")
        for name in ("max_request_body_bytes", "max_n", "max_stop_sequences", "max_logit_bias", "max_prompts",
                     "max_tool_calls", "responses_store_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not 0 <= self.max_logprobs <= 20:
            raise ValueError("max_logprobs must be in [0, 20]")
        if self.role not in ("hybrid", "prefill", "decode"):
            raise ValueError(f"role must be hybrid, prefill or decode, got {self.role!r}")
        if self.migration_timeout <= 0:
            raise ValueError("migration_timeout must be > 0")
        if self.body_read_timeout <= 0 or self.keep_alive_timeout <= 0:
            raise ValueError("body_read_timeout and keep_alive_timeout must be > 0")
