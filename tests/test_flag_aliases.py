"""One name per setting: every deprecated alias gives the same EngineConfig as its canonical flag and warns; the
settings that had two flags (precision, kernels, speculative method) map to the config they mapped to before."""
from __future__ import annotations

import argparse
import warnings

import pytest

from lmserve.cli import add_engine_args, build_engine_config, build_parser, engine_argv
from lmserve.cli.aliases import ALIASES
from lmserve.cli.flags_doc import render

# a value each aliased flag accepts, and a second flag some of them need to build a valid config
VALUES = {"--max-prefill-token-num": ("300", ()), "--speculative-algorithm": ("ngram", ()),
          "--speculative-draft-model": ("ngram", ())}


def _config(*argv):
    return build_engine_config(build_parser().parse_args(["serve", "api_server", *argv]))


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_alias_maps_to_the_canonical_config_and_warns(alias):
    canonical, _peer = ALIASES[alias]
    value, extra = VALUES[canonical]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)   # `--speculative-draft-model ngram` warns on its own
        want = _config(canonical, value, *extra)
    with pytest.warns(FutureWarning, match=f"{alias}.*deprecated alias of {canonical}"):
        got = _config(alias, value, *extra)
    assert got == want
    assert got != _config()     # the flag did something


def test_aliases_are_real_option_strings_and_documented():
    api = argparse.ArgumentParser()
    add_engine_args(api)
    for alias, (canonical, _peer) in ALIASES.items():
        action = api._option_string_actions[alias]
        assert action.option_strings[0] == canonical and alias in action.option_strings
    page = render()
    for alias in ALIASES:
        assert f"`{alias}` (deprecated alias)" in page


def test_canonical_flags_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        _config("--max-prefill-token-num", "300", "--speculative-algorithm", "ngram", "--kernels", "torch")


def test_old_speculative_model_ngram_means_the_ngram_method():
    with pytest.warns(FutureWarning):
        spec = _config("--speculative-model", "[ngram]").speculative
    assert (spec.method, spec.model) == ("ngram", None)
    spec = _config("--speculative-draft-model", "draft.gguf").speculative
    assert (spec.method, spec.model) == ("draft", "draft.gguf")


def test_kernels_flag_covers_the_old_attn_backend_choices():
    auto, torch_, cpp = (_config("--kernels", k).model for k in ("auto", "torch", "cpp"))
    assert (auto.kernels, auto.attention_backend) == ("auto", "auto")
    assert (torch_.kernels, torch_.attention_backend) == ("torch", "auto")
    assert (cpp.kernels, cpp.attention_backend) == ("auto", "cpp")     # the old --attn-backend cpp


def test_dtype_bfloat16_on_cpu_is_the_bf16_matmul_policy():
    """`--dtype bfloat16` on CPU is what `--matmul-dtype bfloat16` was: a float32 model, bf16 matmuls + KV cache."""
    mc = _config("--dtype", "bfloat16", "--device", "cpu").model
    assert (mc.dtype, mc.matmul_dtype, mc.matmul_precision) == ("auto", "bfloat16", "bfloat16")
    assert str(mc.torch_dtype) == "torch.float32"
    exact = _config("--dtype", "float32", "--device", "cpu").model
    assert (exact.dtype, exact.matmul_dtype, exact.matmul_precision) == ("float32", "auto", "float32")
    assert _config("--dtype", "float16", "--device", "cpu").model.dtype == "float16"


def test_launch_forwards_the_canonical_spellings():
    """`lmserve serve launch` re-emits the engine flags for each api_server: canonical names, same config."""
    with pytest.warns(FutureWarning):
        args = build_parser().parse_args(["serve", "api_server", "--max-num-batched-tokens", "300",
                                          "--speculative-method", "ngram", "--kernels", "cpp"])
    argv = engine_argv(args)
    assert argv == ["--max-prefill-token-num", "300", "--kernels", "cpp", "--speculative-algorithm", "ngram"]
    assert _config(*argv) == build_engine_config(args)
