"""Engine flags (shared by api_server, launch, chat and bench throughput) and the one place they become
`EngineConfig`, including a launcher's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Deprecated flag
spellings: cli/aliases.py."""
from __future__ import annotations

import argparse

from lmserve.cli.aliases import NGRAM_MODEL_SPELLINGS, AliasedStore, warn_deprecated
from lmserve.cli.lora_args import add_lora_args, build_lora_config
from lmserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, SpeculativeConfig


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "tb": 10**12}


def parse_bytes(text: str) -> int:
    """'2GiB', '512MB', '1.5g', '1000000' -> bytes (SI units are powers of 10, IEC units powers of 2)."""
    num = text.strip().rstrip("bBiIkKmMgGtT ")
    unit = text.strip()[len(num):].strip().lower()
    try:
        value = float(num) * _UNITS[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size in bytes (e.g. 2GiB, 512MB, 1000000)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the size must be > 0")
    return int(value)


# ---- engine arguments (shared by api_server, chat, bench throughput) -------------------------------------
def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="GGUF file, Hugging Face directory or hub id (default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("--tokenizer", default=None, help="tokenizer path (default: the model's)")
    p.add_argument("--dtype", default="auto",
                   help="auto|float32|bfloat16|float16: the precision policy. On CPU the model runs in float32 "
                        "and this picks the large matmuls' precision: bfloat16 = matmuls (prefill, batched decode) "
                        "in bfloat16 with float32 accumulation and a bfloat16 KV cache, ~2x faster on CPUs with "
                        "AVX512_BF16/AMX but not bit-exact; float32 = the exact mode; auto = bfloat16 where the CPU "
                        "has native bf16, else float32; float16 = a float16 model. On CUDA: the model's dtype (auto: "
                        "bf16 where supported)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N")
    p.add_argument("--chat-template", default=None, help="Jinja chat template string or file")
    p.add_argument("--session-len", type=int, default=None, help="max tokens per session (prompt + output)")
    p.add_argument("--cache-max-entry-count", type=float, default=None,
                   help="fraction of free memory for the KV cache (default 0.8 on CUDA, 0.1 on CPU)")
    p.add_argument("--cache-block-count", type=int, default=None, help="explicit number of KV cache blocks")
    p.add_argument("--kv-cache-memory", type=parse_bytes, default=None, metavar="BYTES",
                   help="memory for the KV cache, e.g. 2GiB, 512MB, 1000000 (default: a fraction of the free "
                        "memory left after the weights, see --cache-max-entry-count)")
    p.add_argument("--cache-block-seq-len", type=int, default=16, help="tokens per KV cache block")
    p.add_argument("--disable-prefix-caching", action="store_true", help="turn automatic prefix caching off")
    p.add_argument("--max-batch-size", type=int, default=256, help="max sequences running at once")
    p.add_argument("--max-prefill-token-num", "--max-num-batched-tokens", dest="max_prefill_token_num", type=int,
                   action=AliasedStore, default=512,
                   help="token budget per engine step (chunked prefill); bounds the inter-token gap of decoding "
                        "requests while prompts are prefilled")
    p.add_argument("--max-burst-batched-tokens", type=int, default=None,
                   help="prefill priority: the step budget while prompts wait and at most --burst-max-decodes "
                        "requests are decoding (default 4 x --max-prefill-token-num; equal to it turns this off)")
    p.add_argument("--burst-max-decodes", type=int, default=4,
                   help="largest decode batch that still gets the burst budget (see --max-burst-batched-tokens)")
    p.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority"],
                   help="fcfs: arrival order; priority: requests' `priority` field first (lower first, then "
                        "arrival), and under KV-cache pressure the lowest-priority running request is preempted")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel ranks: processes each holding 1/tp of the weights and KV cache (gloo on "
                        "CPU, NCCL and one GPU per rank on CUDA)")
    p.add_argument("--nnodes", type=int, default=1, help="machines the tp ranks are spread over")
    p.add_argument("--node-rank", type=int, default=0,
                   help="this machine's index; node 0 serves HTTP, the others only run their ranks")
    p.add_argument("--master-addr", default=None, help="node 0's address for the rendezvous (default 127.0.0.1)")
    p.add_argument("--master-port", type=int, default=None,
                   help="rendezvous port (default: a free one; required with --nnodes > 1)")
    p.add_argument("--seed", type=int, default=None,
                   help="accepted for vLLM compatibility and ignored: seeds are per request (the `seed` field)")
    p.add_argument("--kernels", default="auto", choices=["auto", "torch", "cpp"],
                   help="auto = the fastest implementation of each op that applies here (the C++ kernels on CPU "
                        "float32 when they build, else PyTorch); torch = the PyTorch references end to end (no C++ "
                        "kernels, no packed or quantized weight copies); cpp = as auto, but fail to start unless the "
                        "C++ kernels build")
    p.add_argument("--kernel-build-timeout", type=float, default=600.0,
                   help="seconds start-up waits for the C++ kernels to compile (a first start where the install "
                        "did not build them) before serving on the PyTorch references")
    p.add_argument("--num-threads", type=int, default=None,
                   help="CPU compute threads per rank (default: the physical cores / the ranks on this node)")
    p.add_argument("--weights", default="auto", choices=["auto", "quantized", "float"],
                   help="GGUF files and 16-bit safetensors checkpoints: quantized keeps matrices in the file's "
                        "format (GGUF blocks, F16 / BF16), memory-mapped (memory ~ the file size); float expands "
                        "them once (exact float32, ~8x the memory of a 4-bit file, 2-3x of a 16-bit one); auto "
                        "(default): quantized where the quantized-matmul kernel is available, else float")
    p.add_argument("--quant-activations", default="auto", choices=["auto", "int8", "float"],
                   help="GGUF quantized matmuls at decode size: int8 = activations quantized to int8 (integer dot "
                        "products, llama.cpp's approach; not exact), float = exact; auto = int8 where the CPU has an "
                        "integer dot path (AVX2 or better) unless --dtype float32 is given")
    p.add_argument("--gguf-repack", default="auto", choices=["auto", "none"],
                   help="GGUF Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, Q3_K, Q2_K, IQ4_XS, IQ4_NL and MXFP4 "
                        "matrices with int8 activations: auto (default) rewrites "
                        "them once at load into groups of 8 rows, the layout the int8 kernels read 1.5-5x faster (same "
                        "size; kept in a file every process serving the GGUF shares, see --gguf-repack-cache); none "
                        "serves them from the memory-mapped file as they are")
    p.add_argument("--gguf-repack-cache", default="auto", metavar="DIR|auto|none",
                   help="where --gguf-repack auto keeps the repacked matrices as a file that every process serving "
                        "the same GGUF maps (their pages shared; later starts skip the repack): auto (default) = "
                        "$LMSERVE_REPACK_CACHE (which may say none) or ~/.cache/lmserve/repacked; none = a private "
                        "copy in each process (needs no disk); or a directory. An entry takes about the file's size "
                        "on disk; where the disk lacks room for a new one, other GGUFs' entries used longest ago go "
                        "first, never one a running process maps")
    p.add_argument("--task", default="auto", choices=["auto", "generate", "embed", "score"],
                   help="embed: serve /v1/embeddings and /pooling (an encoder runs with its own pooling) and "
                        "/rerank, /score by cosine; score: a cross-encoder serving /rerank and /score; auto: "
                        "score for *ForSequenceClassification checkpoints, embed for other encoders (BERT "
                        "family), else generate")
    p.add_argument("--generation-config", default="auto", metavar="auto|none|PATH",
                   help="sampling defaults for fields a request leaves out: auto = the model's "
                        "generation_config.json / GGUF metadata / model card; none = the API's own defaults; "
                        "PATH = a generation_config.json or its directory")
    p.add_argument("--speculative-algorithm", "--speculative-method", dest="speculative_algorithm", default=None,
                   choices=["ngram", "draft"], action=AliasedStore,
                   help="speculative decoding: ngram = prompt lookup (drafts copied from the sequence itself; "
                        "no draft model); draft = a draft model (--speculative-draft-model; not implemented yet)")
    p.add_argument("--speculative-draft-model", "--speculative-model", dest="speculative_draft_model", default=None,
                   action=AliasedStore,
                   help="draft model path (implies --speculative-algorithm draft); the alias's vLLM value 'ngram' "
                        "means --speculative-algorithm ngram")
    p.add_argument("--num-speculative-tokens", type=int, default=4, help="draft tokens proposed per step")
    p.add_argument("--prompt-lookup-max", type=int, default=4, help="ngram: longest suffix n-gram looked up")
    p.add_argument("--prompt-lookup-min", type=int, default=2, help="ngram: shortest suffix n-gram looked up")
    p.add_argument("--speculative-disable-by-batch-size", type=int, default=8,
                   help="no proposals in steps with more decoding sequences than this (compute-bound batches)")
    p.add_argument("--max-engine-restarts", type=int, default=5,
                   help="engine-loop restarts allowed within a minute after internal errors (requests in flight "
                        "fail, queued ones are kept); beyond that the engine stays down and /health says 503")
    # NOTE: test-only, hidden; honoured only with LMSERVE_ENABLE_TEST_HOOKS=1 in the environment (engine/fault.py)
    p.add_argument("--test-fault-injection", default=None, help=argparse.SUPPRESS)
    add_lora_args(p)


def _speculative_config(args: argparse.Namespace) -> SpeculativeConfig:
    method, model = args.speculative_algorithm, args.speculative_draft_model
    if model in NGRAM_MODEL_SPELLINGS:       # vLLM's older `--speculative-model [ngram]`
        warn_deprecated(f"the draft model value {model!r}", "--speculative-algorithm ngram")
        method, model = "ngram", None
    elif model is not None and method is None:
        method = "draft"
    return SpeculativeConfig(method=method, model=model, num_speculative_tokens=args.num_speculative_tokens,
                             prompt_lookup_max=args.prompt_lookup_max, prompt_lookup_min=args.prompt_lookup_min,
                             disable_by_batch_size=args.speculative_disable_by_batch_size)


def _precision(args: argparse.Namespace) -> tuple[str, str]:
    """--dtype -> (ModelConfig.dtype, ModelConfig.matmul_dtype). One flag steers the one precision policy: on CPU
    the model stays float32 and `--dtype bfloat16` means bfloat16 matmuls and KV cache (config.resolve_matmul_dtype)
    rather than a model whose norms and activations are bfloat16 too."""
    if args.dtype in ("bfloat16", "bf16"):
        from lmserve.config import resolve_device
        if resolve_device(args.device).type == "cpu":
            return "auto", "bfloat16"
    return args.dtype, "auto"


def build_engine_config(args: argparse.Namespace) -> EngineConfig:
    """The one place CLI arguments become engine config."""
    dtype, matmul_dtype = _precision(args)
    return EngineConfig(
        model=ModelConfig(model=args.model, tokenizer=args.tokenizer, dtype=dtype, device=args.device,
                          chat_template=args.chat_template, max_model_len=args.session_len,
                          # --kernels cpp: the C++ library is required, which ModelConfig spells attention_backend
                          attention_backend="cpp" if args.kernels == "cpp" else "auto",
                          kernels="torch" if args.kernels == "torch" else "auto",
                          kernel_build_timeout=args.kernel_build_timeout,
                          weights=args.weights,
                          num_threads=args.num_threads, matmul_dtype=matmul_dtype, task=args.task,
                          quant_activations=args.quant_activations, gguf_repack=args.gguf_repack,
                          gguf_repack_cache=args.gguf_repack_cache,
                          generation_config=args.generation_config),
        cache=CacheConfig(block_size=args.cache_block_seq_len, cache_max_entry_count=args.cache_max_entry_count,
                          num_blocks=args.cache_block_count, kv_cache_memory=args.kv_cache_memory,
                          enable_prefix_caching=not args.disable_prefix_caching),
        scheduler=SchedulerConfig(max_num_seqs=args.max_batch_size,
                                  max_num_batched_tokens=args.max_prefill_token_num,
                                  max_burst_batched_tokens=args.max_burst_batched_tokens,
                                  burst_max_decodes=args.burst_max_decodes, policy=args.scheduling_policy),
        speculative=_speculative_config(args),
        lora=build_lora_config(args),
        tp=_env_int("WORLD_SIZE", args.tp) if _launched() else args.tp,
        distributed=_distributed_config(args),
        max_engine_restarts=args.max_engine_restarts,
        fault_injection=args.test_fault_injection,
    )


def _launched() -> bool:
    import os
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _env_int(name: str, default):
    import os
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def _distributed_config(args: argparse.Namespace):
    """Flags, or a launcher's environment (torchrun: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), which then
    makes this process exactly one rank."""
    import os

    from lmserve.config import DistributedConfig
    launcher = _launched()
    return DistributedConfig(
        nnodes=args.nnodes, node_rank=args.node_rank,
        master_addr=args.master_addr or os.environ.get("MASTER_ADDR") or "127.0.0.1",
        master_port=args.master_port or _env_int("MASTER_PORT", None),
        rank=_env_int("RANK", None) if launcher else None)


def engine_argv(args: argparse.Namespace) -> list[str]:
    """The engine options in `args` that differ from their defaults, as api_server arguments (for launch)."""
    ref = argparse.ArgumentParser()
    add_engine_args(ref)
    argv = [args.model] if args.model else []
    for action in ref._actions:
        value = getattr(args, action.dest, None)
        if not action.option_strings or action.dest == "help" or value == action.default:
            continue
        if isinstance(value, list):     # nargs="+" (--lora-modules)
            argv += [action.option_strings[0], *map(str, value)]
            continue
        argv += [action.option_strings[0]] if isinstance(value, bool) else [action.option_strings[0], str(value)]
    return argv
