"""LoRA flags: vLLM's `--lora-modules name=path` (or its JSON form) and LMDeploy's `--adapters name=path`, the
limits, and runtime loading (also turned on by vLLM's environment variable VLLM_ALLOW_RUNTIME_LORA_UPDATING)."""
from __future__ import annotations

import argparse
import json
import os

from lmserve.config import LoraConfig


def add_lora_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LoRA adapters")
    g.add_argument("--lora-modules", nargs="+", action="extend", default=None, metavar="NAME=PATH",
                   help="peft adapters to serve, each a model in /v1/models: name=path, or vLLM's JSON "
                        '\'{"name": ..., "path": ..., "base_model_name": ...}\'')
    g.add_argument("--adapters", nargs="+", action="extend", default=None, metavar="NAME=PATH",
                   help="LMDeploy's spelling of --lora-modules name=path")
    g.add_argument("--max-loras", type=int, default=16, help="adapters loaded at once")
    g.add_argument("--max-lora-rank", type=int, default=64, help="largest adapter rank accepted")
    g.add_argument("--enable-lora-runtime-updates", action="store_true",
                   help="serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (admin endpoints); also "
                        "on with VLLM_ALLOW_RUNTIME_LORA_UPDATING=1")


def parse_lora_module(text: str) -> tuple[str, str, str | None]:
    text = text.strip()
    if text.startswith("{"):
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--lora-modules: {text!r} is not valid JSON ({e})") from None
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not isinstance(spec.get("path"), str):
            raise ValueError(f"--lora-modules: {text!r} needs string fields name and path")
        return spec["name"], spec["path"], spec.get("base_model_name")
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--lora-modules / --adapters: {text!r} is not name=path")
    return name, path, None


def build_lora_config(args: argparse.Namespace) -> LoraConfig:
    modules = [parse_lora_module(m) for m in (args.lora_modules or []) + (args.adapters or [])]
    names = [m[0] for m in modules]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ValueError(f"--lora-modules / --adapters: the name {dup!r} is given twice")
    env = os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").strip().lower() in ("1", "true", "yes")
    return LoraConfig(modules=tuple(modules), max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
                      runtime_updates=args.enable_lora_runtime_updates or env)
