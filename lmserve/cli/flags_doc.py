"""docs/flags.md from the parser itself: every flag of every subcommand, its default, its help and the spelling
the reference servers use for the same setting.

    python -m lmserve.cli.flags_doc > docs/flags.md
"""
from __future__ import annotations

import argparse

from lmserve.cli.aliases import ALIASES
from lmserve.cli.commands import build_parser

# lmserve flag -> the peers' spelling of the same setting. A second spelling on our flag (an alias) exists only
# where a peer spells it that way.
PEER_SPELLING = {
    "--session-len": "LMDeploy `--session-len`; vLLM `--max-model-len`",
    "--max-batch-size": "LMDeploy `--max-batch-size`; vLLM `--max-num-seqs`",
    "--max-prefill-token-num": "LMDeploy `--max-prefill-token-num`; vLLM `--max-num-batched-tokens`",
    "--cache-max-entry-count": "LMDeploy `--cache-max-entry-count`; vLLM `--gpu-memory-utilization` (roughly)",
    "--cache-block-seq-len": "LMDeploy `--cache-block-seq-len`; vLLM `--block-size`",
    "--tp": "LMDeploy `--tp`; vLLM `--tensor-parallel-size`",
    "--dtype": "LMDeploy and vLLM `--dtype` (on CPU here it picks the matmul and KV-cache precision)",
    "--tokenizer": "vLLM `--tokenizer`",
    "--chat-template": "LMDeploy and vLLM `--chat-template`",
    "--generation-config": "vLLM `--generation-config`",
    "--task": "vLLM `--task`",
    "--scheduling-policy": "vLLM `--scheduling-policy`",
    "--seed": "vLLM `--seed` (accepted here and ignored: seeds are per request)",
    "--disable-prefix-caching": "vLLM `--no-enable-prefix-caching`; LMDeploy enables it with `--enable-prefix-caching`",
    "--speculative-algorithm": "LMDeploy `--speculative-algorithm`; vLLM `speculative_config.method`",
    "--speculative-draft-model": "LMDeploy `--speculative-draft-model`; vLLM `--speculative-model` (its older form; "
                                 "`ngram` there means `--speculative-algorithm ngram`, and does here)",
    "--num-speculative-tokens": "vLLM `--num-speculative-tokens`; LMDeploy `--speculative-num-draft-tokens`",
    "--prompt-lookup-max": "vLLM `prompt_lookup_max` (speculative config)",
    "--prompt-lookup-min": "vLLM `prompt_lookup_min` (speculative config)",
    "--server-name": "LMDeploy `--server-name`; vLLM `--host`",
    "--server-port": "LMDeploy `--server-port`; vLLM `--port`",
    "--api-keys": "LMDeploy `--api-keys`; vLLM `--api-key`",
    "--tool-call-parser": "LMDeploy and vLLM `--tool-call-parser`",
    "--reasoning-parser": "LMDeploy and vLLM `--reasoning-parser`",
    "--model-name": "LMDeploy `--model-name`; vLLM `--served-model-name`",
    "--limit-mm-per-prompt": "vLLM `--limit-mm-per-prompt` (`image=N` or JSON)",
    "--allowed-local-media-path": "vLLM `--allowed-local-media-path`",
}


def _subparsers(parser: argparse.ArgumentParser, path: list[str]):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subparsers(sub, path + [name])


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render() -> str:
    lines = ["# Flags", "",
             "Every flag of every `lmserve` subcommand, generated from the parser "
             "(`python -m lmserve.cli.flags_doc > docs/flags.md`). One name per setting; a second spelling "
             "(shown after the first) is a deprecated alias, kept only where a peer server spells the setting that "
             "way: it works like the first and warns on use.", ""]
    for path, parser in _subparsers(build_parser(), ["lmserve"]):
        flags = [a for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS
                 and not isinstance(a, argparse._HelpAction)]
        if not flags:
            continue
        lines += [f"## `{' '.join(path)}`", "", "| flag | default | what | peer spelling |", "|---|---|---|---|"]
        for a in flags:
            names = ", ".join(f"`{s}`" + (" (deprecated alias)" if s in ALIASES else "") for s in a.option_strings)
            default = "" if a.default in (None, False) or isinstance(a, argparse._StoreTrueAction) else a.default
            peer = PEER_SPELLING.get(a.option_strings[0], "")
            lines.append(f"| {names} | {_cell(default)} | {_cell(a.help or '')} | {peer} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render())
