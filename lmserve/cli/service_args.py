"""api_server and proxy flags, and the one place each becomes `ServerConfig` / `ProxyConfig`."""
from __future__ import annotations

import argparse

from lmserve.cli.media_args import add_media_args, build_media_config


def _add_security_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("roles and TLS (docs/operations.md)")
    g.add_argument("--admin-api-keys", nargs="*", default=None,
                   help="keys for control endpoints (terminate, sleep, weights, /nodes/add ...); client keys never "
                        "authorize them; without admin keys they answer only to loopback clients")
    g.add_argument("--ssl", action="store_true",
                   help="serve HTTPS with the SSL_KEYFILE / SSL_CERTFILE (/ SSL_CA_CERTS) environment variables")
    g.add_argument("--ssl-keyfile", default=None, help="serve HTTPS with this private key (PEM)")
    g.add_argument("--ssl-certfile", default=None, help="serve HTTPS with this certificate chain (PEM)")
    g.add_argument("--ssl-ca-certs", default=None,
                   help="require client certificates signed by this CA (e.g. between proxy and nodes)")


def _tls(args: argparse.Namespace):
    from lmserve.server.tls import resolve_tls
    return resolve_tls(args.ssl_keyfile, args.ssl_certfile, args.ssl_ca_certs, use_env=args.ssl)


# ---- lmserve serve api_server (owned by the server package) ---------------------------------------------
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
    p.add_argument("--proxy-admin-key", default=None,
                   help="admin key the proxy wants on /nodes/add (default: our first --admin-api-keys)")
    _add_security_args(p)
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
    g.add_argument("--responses-store-size", type=int, default=d.responses_store_size,
                   help="responses kept in memory for previous_response_id (/v1/responses, store=true; LRU)")
    add_media_args(p)
    p.add_argument("--allow-terminate-by-client", action="store_true", help="enable GET /terminate")
    p.add_argument("--role", default=d.role, choices=("hybrid", "prefill", "decode"),
                   help="prefill-decode disaggregation: the role reported to the proxy (docs/architecture.md)")
    p.add_argument("--migration-timeout", type=float, default=d.migration_timeout,
                   help="seconds a prefill server keeps a prompt's KV for its decode server (and a decode "
                        "server's wait for one transfer reply)")
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
    tls = _tls(args)
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
                        max_prompts=args.max_prompts, max_tool_calls=args.max_tool_calls,
                        admin_api_keys=tuple(args.admin_api_keys or ()), proxy_admin_key=args.proxy_admin_key,
                        ssl_keyfile=tls.keyfile, ssl_certfile=tls.certfile, ssl_ca_certs=tls.ca_certs,
                        responses_store_size=args.responses_store_size, role=args.role,
                        migration_timeout=args.migration_timeout, media=build_media_config(args))


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
    p.add_argument("--max-response-routes", type=int, default=d.max_response_routes,
                   help="response ids remembered with their node, for previous_response_id (LRU)")
    p.add_argument("--node-file", default=None, help="JSON file the node list is saved to and restored from")
    p.add_argument("--max-request-body-bytes", type=int, default=d.max_request_body_bytes,
                   help="larger request bodies get 413; image requests are large (base64 data: URIs): keep it at "
                        "least the nodes' own limit")
    p.add_argument("--allowed-node-hosts", nargs="*", default=None,
                   help="CIDRs / hostnames the proxy may ever connect to as nodes (default: any)")
    p.add_argument("--node-ca-certs", default=None, help="CA that https:// nodes' certificates must chain to")
    p.add_argument("--node-ssl-certfile", default=None,
                   help="client certificate shown to nodes (default: --ssl-certfile)")
    p.add_argument("--node-ssl-keyfile", default=None, help="its key (default: --ssl-keyfile)")
    p.add_argument("--breaker-threshold", type=int, default=d.breaker_threshold,
                   help="consecutive failures of a node that open its circuit breaker")
    p.add_argument("--breaker-cooldown", type=float, default=d.breaker_cooldown,
                   help="seconds an open breaker waits before a half-open probe (default: --health-check-interval)")
    p.add_argument("--retry-backoff", type=float, default=d.retry_backoff,
                   help="seconds before the first retry; doubled per retry (with jitter)")
    _add_security_args(p)
    p.add_argument("--balance-factor", type=float, default=d.balance_factor,
                   help="prefix_aware: max outstanding requests on a node, as a multiple of the mean")
    p.add_argument("--serving-strategy", default=d.serving_strategy, choices=("Hybrid", "DistServe"),
                   help="DistServe: prefill on role-prefill nodes, decode on role-decode nodes, KV migrated")
    p.add_argument("--log-level", default="INFO")


def build_proxy_config(args: argparse.Namespace):
    """The one place CLI arguments become proxy config."""
    from lmserve.proxy.config import ProxyConfig
    tls = _tls(args)
    return ProxyConfig(server_name=args.server_name, server_port=args.server_port, strategy=args.strategy,
                       api_keys=tuple(args.api_keys or ()), node_file=args.node_file or None,
                       health_check_interval=args.health_check_interval,
                       health_check_timeout=args.health_check_timeout, request_timeout=args.request_timeout,
                       max_retries=args.max_retries, balance_factor=args.balance_factor, log_level=args.log_level,
                       admin_api_keys=tuple(args.admin_api_keys or ()),
                       allowed_node_hosts=tuple(args.allowed_node_hosts or ()), node_ca_certs=args.node_ca_certs,
                       node_ssl_certfile=args.node_ssl_certfile or tls.certfile,
                       node_ssl_keyfile=args.node_ssl_keyfile or tls.keyfile, ssl_keyfile=tls.keyfile,
                       ssl_certfile=tls.certfile, ssl_ca_certs=tls.ca_certs, breaker_threshold=args.breaker_threshold,
                       breaker_cooldown=args.breaker_cooldown, retry_backoff=args.retry_backoff,
                       max_response_routes=args.max_response_routes,
                       serving_strategy=args.serving_strategy, max_request_body_bytes=args.max_request_body_bytes)
