"""`lmserve` command line. Argument parsing lives here; each subcommand's work lives in its package.

Subcommands:
  lmserve serve api_server [MODEL] ...   OpenAI-compatible + LMDeploy-native REST server
  lmserve serve proxy ...                request distribution over many api_servers
  lmserve serve launch MODEL --num-servers N
  lmserve serve api_client URL           console chat against a running server
  lmserve chat [MODEL]                   terminal chat with an in-process engine
  lmserve bench serve|throughput ...     benchmarks
"""
from __future__ import annotations

import argparse
import sys

from lmserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, SpeculativeConfig, TPConfigError


# ---- engine arguments (shared by api_server, chat, bench throughput) -------------------------------------
def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="GGUF file, Hugging Face directory or hub id (default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("--tokenizer", default=None, help="tokenizer path (default: the model's)")
    p.add_argument("--dtype", default="auto",
                   help="auto|float32|float16|bfloat16. auto on CPU: bfloat16 matmuls (float32 accumulation) and "
                        "KV cache where the CPU has native bf16 (AVX512_BF16/AMX), else float32; bf16 on CUDA. "
                        "float32: the exact mode")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N")
    p.add_argument("--chat-template", default=None, help="Jinja chat template string or file")
    p.add_argument("--session-len", type=int, default=None, help="max tokens per session (prompt + output)")
    p.add_argument("--cache-max-entry-count", type=float, default=None,
                   help="fraction of free memory for the KV cache (default 0.8 on CUDA, 0.1 on CPU)")
    p.add_argument("--cache-block-count", type=int, default=None, help="explicit number of KV cache blocks")
    p.add_argument("--cache-block-seq-len", type=int, default=16, help="tokens per KV cache block")
    p.add_argument("--disable-prefix-caching", action="store_true", help="turn automatic prefix caching off")
    p.add_argument("--max-batch-size", type=int, default=256, help="max sequences running at once")
    p.add_argument("--max-prefill-token-num", type=int, default=512,
                   help="token budget per engine step (chunked prefill)")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel ranks: processes each holding 1/tp of the weights and KV cache (gloo on "
                        "CPU, NCCL and one GPU per rank on CUDA)")
    p.add_argument("--nnodes", type=int, default=1, help="machines the tp ranks are spread over")
    p.add_argument("--node-rank", type=int, default=0,
                   help="this machine's index; node 0 serves HTTP, the others only run their ranks")
    p.add_argument("--master-addr", default=None, help="node 0's address for the rendezvous (default 127.0.0.1)")
    p.add_argument("--master-port", type=int, default=None,
                   help="rendezvous port (default: a free one; required with --nnodes > 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attn-backend", default="auto", choices=["auto", "torch", "cpp"],
                   help="auto = C++ kernels on CPU float32 when they build, else PyTorch; torch = no C++ kernels; "
                        "cpp = require them")
    p.add_argument("--kernels", default="auto", choices=["auto", "torch"],
                   help="auto = the fastest implementation of each op that applies here; torch = the PyTorch "
                        "references end to end (no C++ kernels, no packed or quantized weight copies)")
    p.add_argument("--kernel-build-timeout", type=float, default=600.0,
                   help="seconds start-up waits for the C++ kernels to compile (first start only) before serving "
                        "on the PyTorch references")
    p.add_argument("--num-threads", type=int, default=None,
                   help="CPU compute threads per rank (default: the physical cores / the ranks on this node)")
    p.add_argument("--quant-kernel-max-rows", type=int, default=64,
                   help="GGUF Q4/Q5/Q8 and Q4_K/Q5_K/Q6_K weights: matmuls of at most N rows use the quantized-weight kernel (0 = off)")
    p.add_argument("--matmul-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="bfloat16: large matmuls (prefill, batched decode) in bfloat16 with float32 accumulation, "
                        "~2x faster on CPUs with AVX512_BF16 but not bit-exact; float32 is exact; auto (default) "
                        "follows --dtype's precision policy")
    p.add_argument("--task", default="auto", choices=["auto", "generate", "embed"],
                   help="embed: serve /v1/embeddings and /pooling only (an encoder runs with its own pooling); "
                        "auto: embed for encoder checkpoints (BERT family), else generate")
    p.add_argument("--generation-config", default="auto", metavar="auto|none|PATH",
                   help="sampling defaults for fields a request leaves out: auto = the model's "
                        "generation_config.json / GGUF metadata / model card; none = the API's own defaults; "
                        "PATH = a generation_config.json or its directory")
    p.add_argument("--speculative-method", default=None, choices=["ngram", "draft"],
                   help="speculative decoding: ngram = prompt lookup (drafts copied from the sequence itself; "
                        "no draft model); draft = a draft model (--speculative-model; not implemented yet)")
    p.add_argument("--speculative-model", default=None,
                   help="draft model path (implies --speculative-method draft); 'ngram' = --speculative-method ngram")
    p.add_argument("--num-speculative-tokens", type=int, default=4, help="draft tokens proposed per step")
    p.add_argument("--prompt-lookup-max", type=int, default=4, help="ngram: longest suffix n-gram looked up")
    p.add_argument("--prompt-lookup-min", type=int, default=2, help="ngram: shortest suffix n-gram looked up")
    p.add_argument("--speculative-disable-by-batch-size", type=int, default=8,
                   help="no proposals in steps with more decoding sequences than this (compute-bound batches)")


def _speculative_config(args: argparse.Namespace) -> SpeculativeConfig:
    method, model = args.speculative_method, args.speculative_model
    if model == "ngram":       # vLLM's older spelling
        method, model = "ngram", None
    elif model is not None and method is None:
        method = "draft"
    return SpeculativeConfig(method=method, model=model, num_speculative_tokens=args.num_speculative_tokens,
                             prompt_lookup_max=args.prompt_lookup_max, prompt_lookup_min=args.prompt_lookup_min,
                             disable_by_batch_size=args.speculative_disable_by_batch_size)


def build_engine_config(args: argparse.Namespace) -> EngineConfig:
    """The one place CLI arguments become engine config."""
    return EngineConfig(
        model=ModelConfig(model=args.model, tokenizer=args.tokenizer, dtype=args.dtype, device=args.device,
                          chat_template=args.chat_template, max_model_len=args.session_len, seed=args.seed,
                          attention_backend=args.attn_backend, kernels=args.kernels,
                          kernel_build_timeout=args.kernel_build_timeout,
                          quant_kernel_max_rows=args.quant_kernel_max_rows,
                          num_threads=args.num_threads, matmul_dtype=args.matmul_dtype, task=args.task,
                          generation_config=args.generation_config),
        cache=CacheConfig(block_size=args.cache_block_seq_len, cache_max_entry_count=args.cache_max_entry_count,
                          num_blocks=args.cache_block_count,
                          enable_prefix_caching=not args.disable_prefix_caching),
        scheduler=SchedulerConfig(max_num_seqs=args.max_batch_size,
                                  max_num_batched_tokens=args.max_prefill_token_num),
        speculative=_speculative_config(args),
        tp=_env_int("WORLD_SIZE", args.tp) if _launched() else args.tp,
        distributed=_distributed_config(args),
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


# ---- lmserve chat -----------------------------------------------------------------------------------------
def _add_chat(sub) -> None:
    p = sub.add_parser("chat", help="terminal chat with an in-process engine")
    add_engine_args(p)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=None, help="default: the model's (--generation-config)")
    p.add_argument("--top-p", type=float, default=None, help="default: the model's (--generation-config)")
    p.add_argument("--system", default=None, help="system prompt")
    p.set_defaults(func=_run_chat)


def _run_chat(args) -> int:
    from lmserve.client.chat import run_local_chat
    return run_local_chat(build_engine_config(args), args)


# ---- lmserve serve api_server (owned by the server package) ---------------------------------------------
def _add_api_server(sub) -> None:
    p = sub.add_parser("api_server", help="OpenAI-compatible + LMDeploy-native REST API server")
    add_engine_args(p)
    add_server_args(p)
    p.set_defaults(func=_run_api_server)


def add_server_args(p: argparse.ArgumentParser) -> None:
    from lmserve.config import ServerConfig
    d = ServerConfig()
    p.add_argument("--server-name", default=d.server_name, help="host to bind")
    p.add_argument("--server-port", type=int, default=d.server_port)
    p.add_argument("--model-name", default=None, help="name served in /v1/models (default: the model file's stem)")
    p.add_argument("--api-keys", nargs="*", default=None, help="keys clients must send as 'Authorization: Bearer KEY'")
    p.add_argument("--allow-origins", nargs="*", default=None, help="CORS origins, e.g. '*'")
    p.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials")
    p.add_argument("--allow-methods", nargs="*", default=list(d.allow_methods), help="CORS methods")
    p.add_argument("--allow-headers", nargs="*", default=list(d.allow_headers), help="CORS headers")
    p.add_argument("--max-concurrent-requests", type=int, default=d.max_concurrent_requests,
                   help="generation requests in flight; more wait in a queue")
    p.add_argument("--max-queued-requests", type=int, default=d.max_queued_requests,
                   help="requests waiting for admission; beyond this the server answers 429")
    p.add_argument("--proxy-url", default=None, help="register this server with the proxy at this URL")
    p.add_argument("--tool-call-parser", default=None,
                   help="hermes|qwen|llama3|mistral|internlm2 (default: picked from the chat template)")
    p.add_argument("--reasoning-parser", default=None,
                   help="think (<think>...</think>, Qwen3 / DeepSeek-R1): message.reasoning_content")
    g = p.add_argument_group("request limits (docs/operations.md)")
    g.add_argument("--max-request-body-bytes", type=int, default=d.max_request_body_bytes,
                   help="larger request bodies get 413 (POST /update_weights is exempt)")
    g.add_argument("--body-read-timeout", type=float, default=d.body_read_timeout,
                   help="seconds a client may take to send its request body, else 408")
    g.add_argument("--keep-alive-timeout", type=float, default=d.keep_alive_timeout,
                   help="seconds an idle keep-alive connection stays open")
    g.add_argument("--max-n", type=int, default=d.max_n, help="largest n / best_of")
    g.add_argument("--max-logprobs", type=int, default=d.max_logprobs, help="largest logprobs / top_logprobs")
    g.add_argument("--max-stop-sequences", type=int, default=d.max_stop_sequences,
                   help="most stop strings (and stop_token_ids) in one request")
    g.add_argument("--max-logit-bias", type=int, default=d.max_logit_bias, help="most logit_bias entries")
    g.add_argument("--max-tool-calls", type=int, default=d.max_tool_calls,
                   help="most tool calls in one message when tool_choice is required (small models repeat calls)")
    g.add_argument("--max-prompts", type=int, default=d.max_prompts,
                   help="most prompts in one completions request / inputs in one embeddings request")
    p.add_argument("--allow-terminate-by-client", action="store_true", help="enable GET /terminate")
    p.add_argument("--log-level", default=d.log_level, help="DEBUG|INFO|WARNING|ERROR")


def build_server_config(args: argparse.Namespace):
    """The one place CLI arguments become server config."""
    from lmserve.config import ServerConfig
    from lmserve.server.reasoning_parsers import REASONING_PARSERS
    from lmserve.server.tool_parsers import TOOL_PARSERS
    for flag, value, choices in (("--tool-call-parser", args.tool_call_parser, TOOL_PARSERS),
                                 ("--reasoning-parser", args.reasoning_parser, REASONING_PARSERS)):
        if value is not None and value not in choices:
            raise ValueError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")
    return ServerConfig(server_name=args.server_name, server_port=args.server_port, model_name=args.model_name,
                        api_keys=tuple(args.api_keys or ()), allow_origins=tuple(args.allow_origins or ()),
                        allow_credentials=args.allow_credentials, allow_methods=tuple(args.allow_methods),
                        allow_headers=tuple(args.allow_headers),
                        max_concurrent_requests=args.max_concurrent_requests,
                        max_queued_requests=args.max_queued_requests, proxy_url=args.proxy_url,
                        tool_call_parser=args.tool_call_parser, reasoning_parser=args.reasoning_parser,
                        log_level=args.log_level.upper(), max_request_body_bytes=args.max_request_body_bytes,
                        body_read_timeout=args.body_read_timeout, keep_alive_timeout=args.keep_alive_timeout,
                        max_n=args.max_n, max_logprobs=args.max_logprobs,
                        max_stop_sequences=args.max_stop_sequences, max_logit_bias=args.max_logit_bias,
                        max_prompts=args.max_prompts, max_tool_calls=args.max_tool_calls)


def _run_api_server(args) -> int:
    try:
        engine_config, server_config = build_engine_config(args), build_server_config(args)
    except ValueError as e:
        raise SystemExit(f"api_server: {e}") from None
    from lmserve.engine.distributed import DistributedInitError
    try:
        if not engine_config.is_driver:     # another node's (or a launcher's) rank: no HTTP, only the model
            from lmserve.engine.worker import run_worker_node
            from lmserve.model.loader import resolve_model_path
            return run_worker_node(engine_config, resolve_model_path(engine_config.model.model))
        from lmserve.server.launch import run_api_server
        return run_api_server(engine_config, server_config,
                              allow_terminate_by_client=args.allow_terminate_by_client)
    except (DistributedInitError, TPConfigError) as e:
        raise SystemExit(f"api_server: {e}") from None


# ---- lmserve serve proxy / launch (owned by the proxy package) -------------------------------------------
def _add_proxy_args(p: argparse.ArgumentParser) -> None:
    from lmserve.proxy.config import STRATEGIES, ProxyConfig
    d = ProxyConfig()
    p.add_argument("--strategy", "--routing-strategy", dest="strategy", default=d.strategy, choices=STRATEGIES,
                   help=f"how requests are spread over nodes (default: {d.strategy})")
    p.add_argument("--api-keys", nargs="*", default=None, help="keys clients must send as 'Authorization: Bearer KEY'")
    p.add_argument("--health-check-interval", type=float, default=d.health_check_interval, help="seconds")
    p.add_argument("--health-check-timeout", type=float, default=d.health_check_timeout, help="seconds")
    p.add_argument("--request-timeout", type=float, default=d.request_timeout,
                   help="max seconds to wait for the next byte from a node")
    p.add_argument("--max-retries", type=int, default=d.max_retries,
                   help="other nodes tried when a node fails before the first byte")
    p.add_argument("--node-file", default=None, help="JSON file the node list is saved to and restored from")
    p.add_argument("--balance-factor", type=float, default=d.balance_factor,
                   help="prefix_aware: max outstanding requests on a node, as a multiple of the mean")
    p.add_argument("--log-level", default="INFO")


def build_proxy_config(args: argparse.Namespace):
    """The one place CLI arguments become proxy config."""
    from lmserve.proxy.config import ProxyConfig
    return ProxyConfig(server_name=args.server_name, server_port=args.server_port, strategy=args.strategy,
                       api_keys=tuple(args.api_keys or ()), node_file=args.node_file or None,
                       health_check_interval=args.health_check_interval,
                       health_check_timeout=args.health_check_timeout, request_timeout=args.request_timeout,
                       max_retries=args.max_retries, balance_factor=args.balance_factor, log_level=args.log_level)


def engine_argv(args: argparse.Namespace) -> list[str]:
    """The engine options in `args` that differ from their defaults, as api_server arguments (for launch)."""
    ref = argparse.ArgumentParser()
    add_engine_args(ref)
    argv = [args.model] if args.model else []
    for action in ref._actions:
        value = getattr(args, action.dest, None)
        if not action.option_strings or action.dest == "help" or value == action.default:
            continue
        argv += [action.option_strings[0]] if isinstance(value, bool) else [action.option_strings[0], str(value)]
    return argv


def _add_proxy(sub) -> None:
    p = sub.add_parser("proxy", help="distribute requests over many api_servers")
    p.add_argument("--server-name", default="0.0.0.0", help="host to bind")
    p.add_argument("--server-port", type=int, default=8000)
    _add_proxy_args(p)
    p.set_defaults(func=_run_proxy)

    p = sub.add_parser("launch", help="start N api_servers behind a proxy on this machine")
    add_engine_args(p)
    p.add_argument("--num-servers", type=int, default=2, help="api_server processes to start")
    p.add_argument("--server-name", default="0.0.0.0", help="host the proxy binds")
    p.add_argument("--server-port", type=int, default=8000, help="the proxy's port")
    p.add_argument("--base-port", type=int, default=23333, help="api_server i listens on base-port + i")
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for all api_servers")
    _add_proxy_args(p)
    p.set_defaults(func=_run_launch)


def _run_proxy(args) -> int:
    from lmserve.proxy.launch import run_proxy
    return run_proxy(build_proxy_config(args))


def _run_launch(args) -> int:
    from lmserve.proxy.launch import launch
    if args.num_servers < 1:
        raise SystemExit("launch: --num-servers must be >= 1")
    return launch(build_proxy_config(args), args.num_servers, engine_argv(args), base_port=args.base_port,
                  startup_timeout=args.startup_timeout)


# ---- lmserve serve api_client (owned by the client package) ---------------------------------------------
def _add_api_client(sub) -> None:
    p = sub.add_parser("api_client", help="console chat against a running api_server")
    p.add_argument("api_server_url", help="http://host:port of the api_server")
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--session-id", type=int, default=None, help="server-side session id (default: random)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="max tokens per reply")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40)
    p.set_defaults(func=_run_api_client)


def _run_api_client(args) -> int:
    from lmserve.client.chat import run_api_client
    return run_api_client(args.api_server_url, api_key=args.api_key, session_id=args.session_id,
                          temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          max_new_tokens=args.max_new_tokens)


# ---- lmserve bench (owned by the bench package) -----------------------------------------------------------
def _add_dataset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="random", choices=["random", "prefix-repetition", "jsonl"])
    p.add_argument("--dataset-path", default=None, help="JSONL file for --dataset jsonl: {\"prompt\": ...} per line")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens (after any shared prefix)")
    p.add_argument("--output-len", type=int, default=128, help="max output tokens per request")
    p.add_argument("--prefix-len", type=int, default=0, help="shared-prefix tokens before each prompt")
    p.add_argument("--num-prefixes", type=int, default=4, help="distinct prefixes for prefix-repetition")
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="random lengths within [len*(1-r), len*(1+r)]")
    p.add_argument("--ignore-eos", action="store_true", help="generate exactly --output-len tokens")
    p.add_argument("--save-result", default=None, metavar="FILE.json")


def _add_bench(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)

    p = bench.add_parser("serve", help="load-test any OpenAI-compatible server")
    p.add_argument("--base-url", default="http://127.0.0.1:23333")
    p.add_argument("--endpoint", default="/v1/completions", choices=["/v1/completions", "/v1/chat/completions"])
    p.add_argument("--model", default=None, help="model name to send (default: the server's first /v1/models)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer for building prompts and counting tokens (default: bundled SmolLM2 GGUF)")
    _add_dataset_args(p)
    p.add_argument("--num-prompts", type=int, default=None,
                   help="requests per run (default 100; with --sweep-concurrency, max(2*c, 8) per level)")
    p.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests/s, Poisson arrivals (default inf: all at once)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sweep-concurrency", default=None, metavar="1,4,16,64",
                   help="run once per max-concurrency level")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="throughput and latency vs concurrency")
    p.add_argument("--extra-body", default=None, metavar="JSON", help="extra fields merged into each request")
    p.add_argument("--label", default=None, help="name for this server in reports and plots")
    p.add_argument("--num-warmups", type=int, default=1, help="short unmeasured requests before each run")
    p.add_argument("--request-timeout", type=float, default=3600.0, help="seconds per request")
    p.add_argument("--wait-ready", type=float, default=0.0, metavar="SECONDS",
                   help="poll /v1/models up to this long before starting")
    p.add_argument("--save-detailed", action="store_true", help="include per-request results in --save-result")
    p.add_argument("--disable-tqdm", action="store_true")
    p.set_defaults(func=_run_bench_serve)

    p = bench.add_parser("throughput", help="offline throughput of the in-process engine")
    add_engine_args(p)
    _add_dataset_args(p)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--num-warmups", type=int, default=1)
    p.set_defaults(func=_run_bench_throughput)


def _run_bench_serve(args) -> int:
    from lmserve.bench.serve import main as bench_serve
    return bench_serve(args)


def _run_bench_throughput(args) -> int:
    from lmserve.bench.throughput import main as bench_throughput
    return bench_throughput(args, build_engine_config(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmserve", description="Serve LLMs behind an OpenAI-compatible API")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run a server").add_subparsers(dest="server", required=True)
    _add_api_server(serve)
    _add_proxy(serve)
    _add_api_client(serve)
    _add_chat(sub)
    _add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
