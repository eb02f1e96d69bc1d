"""One name per setting: the canonical flag is the first option string of an argparse action; a second spelling
on the same action is a deprecated alias, kept only where a peer server spells the setting that way. Using an
alias works exactly like the canonical flag and warns once (a FutureWarning, which Python shows by default).

`ALIASES` is the table docs/flags.md and tests/test_flag_aliases.py read: alias -> (canonical flag, the peer
that spells it so).
"""
from __future__ import annotations

import argparse
import warnings

ALIASES = {
    "--max-num-batched-tokens": ("--max-prefill-token-num", "vLLM"),
    "--speculative-method": ("--speculative-algorithm", "vLLM's `speculative_config.method`"),
    "--speculative-model": ("--speculative-draft-model", "vLLM before `--speculative-config`"),
}

# vLLM's older `--speculative-model [ngram]` named the method where a draft model path goes
NGRAM_MODEL_SPELLINGS = ("ngram", "[ngram]")


def warn_deprecated(used: str, canonical: str, extra: str = "") -> None:
    warnings.warn(f"{used} is a deprecated alias of {canonical}{extra}; use {canonical}", FutureWarning,
                  stacklevel=3)


class AliasedStore(argparse._StoreAction):
    """`store`, warning when the option was given by one of its alias spellings."""

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string is not None and option_string != self.option_strings[0]:
            warn_deprecated(option_string, self.option_strings[0])
        super().__call__(parser, namespace, values, option_string)
