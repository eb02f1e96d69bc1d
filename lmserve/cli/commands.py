"""The `lmserve` subcommands: each one's parser (from the flag groups in engine_args / service_args) and its
runner, which hands the built config to the package that owns the work; `build_parser` and `main`."""
from __future__ import annotations

import argparse

from lmserve.cli.engine_args import add_engine_args, build_engine_config, engine_argv
from lmserve.cli.service_args import _add_proxy_args, add_server_args, build_proxy_config, build_server_config
from lmserve.config import TPConfigError
from lmserve.generation_config import API_DEFAULTS


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


# ---- lmserve build-kernels ----------------------------------------------------------------------------------
def _add_build_kernels(sub) -> None:
    p = sub.add_parser("build-kernels", help="compile the C++ CPU kernels into the cache the servers read, so that "
                                             "a first start compiles nothing, where the install did not build them "
                                             "into the package (an image build, an install script)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the build (or for another "
                                                                 "process building the same kernels)")
    p.set_defaults(func=_run_build_kernels)


def _run_build_kernels(args) -> int:
    import logging
    import time

    from lmserve.ops import cpu_isa, cpu_kernels
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.monotonic()
    module = cpu_kernels.build(args.timeout)
    if module is None:
        print("build-kernels: the C++ CPU kernels could not be built here (see above); servers will use the "
              "PyTorch references")
        return 1
    print(f"build-kernels: CPU kernels ready in {cpu_kernels.loaded_dir()} ({time.monotonic() - t0:.1f} s; "
          f"baseline {cpu_isa.baseline()}, this CPU runs level {cpu_isa.detected()})")
    return 0


# ---- lmserve serve api_server (owned by the server package) ---------------------------------------------
def _add_api_server(sub) -> None:
    p = sub.add_parser("api_server", help="OpenAI-compatible + LMDeploy-native REST API server")
    add_engine_args(p)
    add_server_args(p)
    p.set_defaults(func=_run_api_server)


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
def _add_proxy(sub) -> None:
    p = sub.add_parser("proxy", help="distribute requests over many api_servers")
    p.add_argument("--server-name", default="0.0.0.0", help="host to bind")
    p.add_argument("--server-port", type=int, default=8000)
    _add_proxy_args(p)
    p.set_defaults(func=_run_proxy)

    p = sub.add_parser("launch", help="start N api_servers behind a proxy on this machine")
    add_engine_args(p)
    p.add_argument("--num-servers", type=int, default=2, help="api_server processes to start")
    p.add_argument("--prefill-servers", type=int, default=0,
                   help="DistServe: prefill api_servers to start (with --decode-servers; replaces --num-servers)")
    p.add_argument("--decode-servers", type=int, default=0, help="DistServe: decode api_servers to start")
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
    import dataclasses

    from lmserve.proxy.launch import launch
    config, roles = build_proxy_config(args), None
    if args.prefill_servers or args.decode_servers:
        if args.prefill_servers < 1 or args.decode_servers < 1:
            raise SystemExit("launch: --prefill-servers and --decode-servers must both be >= 1")
        roles = ["prefill"] * args.prefill_servers + ["decode"] * args.decode_servers
        args.num_servers = len(roles)
        config = dataclasses.replace(config, serving_strategy="DistServe")
    if args.num_servers < 1:
        raise SystemExit("launch: --num-servers must be >= 1")
    return launch(config, args.num_servers, engine_argv(args), base_port=args.base_port,
                  startup_timeout=args.startup_timeout, roles=roles)


# ---- lmserve serve api_client (owned by the client package) ---------------------------------------------
def _add_api_client(sub) -> None:
    p = sub.add_parser("api_client", help="console chat against a running api_server")
    p.add_argument("api_server_url", help="http://host:port of the api_server")
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--session-id", type=int, default=None, help="server-side session id (default: random)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="max tokens per reply")
    defaults = API_DEFAULTS["interactive"]     # it speaks /v1/chat/interactive
    p.add_argument("--temperature", type=float, default=defaults["temperature"])
    p.add_argument("--top-p", type=float, default=defaults["top_p"])
    p.add_argument("--top-k", type=int, default=defaults["top_k"])
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
    _add_build_kernels(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0
