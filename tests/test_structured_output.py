"""Structured output (response_format, guided_*, structured_outputs) against a real server, plus the engine-level
guarantee that unconstrained rows of a mixed batch get exactly the tokens they get alone."""
from __future__ import annotations

import json
import re
from typing import Literal

import httpx
import jsonschema
import pytest
from pydantic import BaseModel, Field

from json_schemas import SCHEMAS

FAST = [9, 12, 16]          # a representative subset: nested object, anyOf, optional properties
SEEDS = (1, 2)


# constrained outputs run to the end of the grammar; on a busy 2-core machine that can take minutes
CLIENT_TIMEOUT = 600


def _schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}


def _check_json(text: str, finish_reason: str, schema: dict) -> None:
    assert finish_reason == "stop", f"unfinished ({finish_reason}): {text!r}"
    jsonschema.validate(json.loads(text), schema)


def _ask(client, model, schema, seed, n=1, max_tokens=200):
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Reply with a JSON example."}],
        response_format=_schema_format(schema), temperature=1.0, seed=seed, n=n, max_tokens=max_tokens)


@pytest.mark.parametrize("i", FAST)
def test_json_schema_outputs_validate(client, model, i):
    resp = _ask(client, model, SCHEMAS[i], SEEDS[0], n=2)
    for c in resp.choices:
        _check_json(c.message.content, c.finish_reason, SCHEMAS[i])


@pytest.mark.slow
@pytest.mark.parametrize("i", range(len(SCHEMAS)))
def test_every_json_schema_validates_with_seeds_n4_and_streaming(client, model, i):
    schema = SCHEMAS[i]
    for seed in SEEDS:
        c = _ask(client, model, schema, seed).choices[0]
        _check_json(c.message.content, c.finish_reason, schema)
    for c in _ask(client, model, schema, 7, n=4).choices:
        _check_json(c.message.content, c.finish_reason, schema)
    _check_stream(client, model, schema)


def _check_stream(client, model, schema):
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "JSON please"}], response_format=_schema_format(schema),
        temperature=1.0, seed=3, n=2, max_tokens=200, stream=True)
    texts, reasons = ["", ""], [None, None]
    for chunk in stream:
        for ch in chunk.choices:
            texts[ch.index] += ch.delta.content or ""
            reasons[ch.index] = ch.finish_reason or reasons[ch.index]
    for text, reason in zip(texts, reasons):
        _check_json(text, reason, schema)


def test_streamed_json_schema_validates(client, model):
    _check_stream(client, model, SCHEMAS[6])


def test_json_object_and_structured_outputs(url, client, model):
    resp = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "a JSON object"}],
                                          response_format={"type": "json_object"}, temperature=1.0, seed=5,
                                          max_tokens=40)
    c = resp.choices[0]
    if c.finish_reason == "stop":
        assert isinstance(json.loads(c.message.content), dict)
    else:   # an unbounded object may run past max_tokens; what there is must still be a JSON object's prefix
        assert c.message.content.startswith("{")
    body = {"model": model, "messages": [{"role": "user", "content": "pick"}], "max_tokens": 10,
            "structured_outputs": {"choice": ["up", "down"]}, "temperature": 1.0}
    assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600).json()[
        "choices"][0]["message"]["content"] in ("up", "down")


def test_regex_and_choice_on_every_endpoint(url, client, model):
    pattern = r"[A-Z]{2}-[0-9]{3}"
    for seed in SEEDS:
        c = client.completions.create(model=model, prompt="Code:", max_tokens=20, temperature=1.0, seed=seed,
                                      extra_body={"guided_regex": pattern}).choices[0]
        assert re.fullmatch(pattern, c.text) and c.finish_reason == "stop"
        c = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Pick a colour"}],
                                           temperature=1.0, seed=seed, max_tokens=10, n=3,
                                           extra_body={"guided_choice": ["red", "green", "blue"]})
        assert all(ch.message.content in ("red", "green", "blue") for ch in c.choices)
    # LMDeploy's regex_schema, on chat and on /generate
    rf = {"type": "regex_schema", "regex_schema": pattern}
    c = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "code"}],
                                       response_format=rf, max_tokens=20, temperature=1.0)
    assert re.fullmatch(pattern, c.choices[0].message.content)
    out = httpx.post(f"{url}/generate", json={"prompt": "Code:", "max_tokens": 20, "response_format": rf},
                     timeout=600).json()
    assert re.fullmatch(pattern, out["text"]), out
    # an EBNF grammar
    c = client.completions.create(model=model, prompt="Answer:", max_tokens=10, temperature=1.0,
                                  extra_body={"guided_grammar": 'root ::= ("yes" | "no") "!"'}).choices[0]
    assert c.text in ("yes!", "no!")


class Person(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=120)
    hobbies: list[Literal["chess", "music", "hiking"]] = Field(max_length=2)


def test_sdk_parse_returns_a_parsed_object(client, model):
    resp = client.beta.chat.completions.parse(
        model=model, messages=[{"role": "user", "content": "Describe a person."}], response_format=Person,
        temperature=0, max_tokens=100)
    parsed = resp.choices[0].message.parsed
    assert isinstance(parsed, Person)


def test_logprobs_stop_and_stream_on_constrained_output(client, model):
    c = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "a number"}],
                                       max_tokens=20, temperature=0, logprobs=True, top_logprobs=2,
                                       extra_body={"guided_regex": "[0-9]{4}"}).choices[0]
    assert re.fullmatch("[0-9]{4}", c.message.content)
    assert "".join(t.token for t in c.logprobs.content).startswith(c.message.content)


@pytest.mark.parametrize("extra, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"response_format": {"type": "regex_schema", "regex_schema": "a("}}, "response_format"),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_grammar": "root ::= nothing_defined"}, "guided_grammar"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
])
def test_bad_constraints_are_400_naming_the_field(url, model, extra, param):
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}
    resp = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param
    assert httpx.post(f"{url}/v1/chat/completions", json={**body, **{k: None for k in extra}},
                      timeout=300).status_code == 200


# ---- engine level ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_engine(tiny_models):
    from lmserve.config import CacheConfig, EngineConfig, ModelConfig
    from lmserve.engine.llm_engine import LLMEngine
    return LLMEngine(EngineConfig(model=ModelConfig(model=tiny_models["llama"]), cache=CacheConfig(num_blocks=256)))


def test_mixed_batch_leaves_unconstrained_rows_untouched(tiny_engine):
    from lmserve.sampling_params import GuidedDecodingParams, SamplingParams
    plain = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
             SamplingParams(max_tokens=12, temperature=1.0, seed=11, ignore_eos=True)]
    prompts = ["The capital of France is", "One two three"]
    alone = [o.outputs[0].token_ids for o in tiny_engine.generate(prompts, plain)]
    guided = SamplingParams(max_tokens=40, temperature=1.0, seed=3,
                            guided=GuidedDecodingParams(json=json.dumps(SCHEMAS[0])))
    mixed = tiny_engine.generate(prompts + ["JSON:", "JSON:"], plain + [guided, guided])
    assert [o.outputs[0].token_ids for o in mixed[:2]] == alone
    for o in mixed[2:]:
        if o.outputs[0].finish_reason.value == "stop":   # random weights: the grammar may not finish in 40
            jsonschema.validate(json.loads(o.outputs[0].text), SCHEMAS[0])


def test_grammar_compiles_once_per_schema(tiny_engine):
    from lmserve.sampling_params import GuidedDecodingParams
    stats = tiny_engine.grammars.stats
    g = GuidedDecodingParams(json=json.dumps(SCHEMAS[5]))
    before = stats.num_compiled
    tiny_engine.grammars.compile(g)
    tiny_engine.grammars.compile(GuidedDecodingParams(json=json.dumps(SCHEMAS[5]), param="guided_json"))
    assert stats.num_compiled == before + 1 and stats.num_cache_hits >= 1


def test_grammar_starts_after_the_reasoning_block(tiny_engine):
    import torch

    from lmserve.engine.guided import apply_bitmask
    from lmserve.sampling_params import GuidedDecodingParams
    state = tiny_engine.grammars.new_state(GuidedDecodingParams(regex="[0-9]+", start_after="</think>"))
    tok = tiny_engine.tokenizer
    text = ""
    for t in tok.encode("<think>hmm", add_special_tokens=False):
        text += tok.decode([t])
        state.accept(t, text)
    assert not state.constrains                       # reasoning is free
    for t in tok.encode("</think>", add_special_tokens=False):
        text += tok.decode([t])
        state.accept(t, text)
    assert state.constrains
    logits = torch.randn(2, tiny_engine.vocab_size)
    apply_bitmask(logits, [(1, state)])
    assert tok.decode([int(logits[1].argmax())]).strip().isdigit()
    assert torch.isfinite(logits[0]).all()            # the other row is untouched
