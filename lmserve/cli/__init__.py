"""`lmserve` command line. Argument parsing lives here; each subcommand's work lives in its package.

Subcommands:
  lmserve serve api_server [MODEL] ...   OpenAI-compatible + LMDeploy-native REST server
  lmserve serve proxy ...                request distribution over many api_servers
  lmserve serve launch MODEL --num-servers N
  lmserve serve api_client URL           console chat against a running server
  lmserve chat [MODEL]                   terminal chat with an in-process engine
  lmserve bench serve|throughput ...     benchmarks

One job per module; this package re-exports them (`from lmserve.cli import build_parser`):
  engine_args   engine flags and `build_engine_config` (the one place they become EngineConfig)
  service_args  api_server / proxy flags and `build_server_config` / `build_proxy_config`
  commands      each subcommand's parser and runner, `build_parser`, `main`
"""
from __future__ import annotations

from lmserve.cli.commands import build_parser, main
from lmserve.cli.engine_args import add_engine_args, build_engine_config, engine_argv
from lmserve.cli.service_args import add_server_args, build_proxy_config, build_server_config

__all__ = ["add_engine_args", "add_server_args", "build_engine_config", "build_parser", "build_proxy_config",
           "build_server_config", "engine_argv", "main"]
