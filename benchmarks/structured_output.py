"""Constrained (JSON schema) vs unconstrained decoding throughput, and grammar compile time (cold and cached).

    python benchmarks/structured_output.py [--concurrency 16,64] [--max-tokens 48] [--model PATH]

For each concurrency C, C requests are submitted at once to the in-process engine (so they decode as one batch),
twice in the same run: unconstrained, then every request constrained by a mid-sized JSON schema (an object with
nested objects, enums, bounded numbers and an array of objects). Both sample at temperature 1.0 with fixed seeds
and ignore_eos, so the unconstrained run produces max_tokens per request; output tok/s = output tokens / wall time.
The constrained run's requests may finish earlier (when the grammar ends), so tok/s is the fair figure.
"""
from __future__ import annotations

import argparse
import json
import time

from lmserve.config import CacheConfig, EngineConfig, ModelConfig
from lmserve.engine.guided import GrammarCache
from lmserve.engine.llm_engine import LLMEngine
from lmserve.sampling_params import GuidedDecodingParams, SamplingParams

S = {"type": "string", "maxLength": 16}
MID_SCHEMA = {
    "type": "object", "additionalProperties": False,
    "required": ["id", "customer", "status", "items", "total"],
    "properties": {
        "id": {"type": "string", "pattern": "^ORD-[0-9]{6}$"},
        "customer": {"type": "object", "additionalProperties": False, "required": ["name", "email"],
                     "properties": {"name": S, "email": {"type": "string", "pattern": "^[a-z]{1,10}@[a-z]{1,10}\\.com$"},
                                    "vip": {"type": "boolean"}}},
        "status": {"enum": ["pending", "paid", "shipped", "delivered", "cancelled"]},
        "items": {"type": "array", "minItems": 1, "maxItems": 20, "items": {
            "type": "object", "additionalProperties": False, "required": ["sku", "qty", "price"],
            "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                           "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                           "price": {"type": "number", "minimum": 0, "maximum": 10000}}}},
        "total": {"type": "number", "minimum": 0},
        "notes": {"anyOf": [S, {"type": "null"}]},
    },
}
COMPILE_SCHEMAS = {
    "small (1 property)": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
    "mid (order, above)": MID_SCHEMA,
    "tools (2 functions, anyOf)": {"type": "array", "minItems": 1, "items": {"anyOf": [
        {"type": "object", "properties": {"name": {"const": f"fn{i}"}, "parameters": MID_SCHEMA},
         "required": ["name", "parameters"]} for i in range(2)]}},
}


def run(engine: LLMEngine, prompt: str, concurrency: int, max_tokens: int, guided) -> tuple[float, int]:
    params = [SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=i, ignore_eos=guided is None,
                             guided=guided) for i in range(concurrency)]
    t0 = time.perf_counter()
    outs = engine.generate([prompt] * concurrency, params)
    elapsed = time.perf_counter() - t0
    num_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    if guided is not None:
        for o in outs:
            if o.outputs[0].finish_reason.value == "stop":
                json.loads(o.outputs[0].text)         # the benchmark checks what it measures
    return num_tokens / elapsed, num_tokens


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--concurrency", default="16,64")
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args()
    engine = LLMEngine(EngineConfig(model=ModelConfig(model=args.model), cache=CacheConfig(num_blocks=4096)))
    prompt = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write an example order as JSON with a few items."}])

    print("grammar compile time (ms), fresh cache per schema:")
    for name, schema in COMPILE_SCHEMAS.items():
        cache = GrammarCache(engine.tokenizer.hf, engine.vocab_size, engine.eos_token_ids)
        cache.compile(GuidedDecodingParams(json='{"type": "object"}'))    # tokenizer info built, not timed
        g = GuidedDecodingParams(json=json.dumps(schema, sort_keys=True))
        t0 = time.perf_counter()
        cache.compile(g)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        cache.compile(g)
        cached = time.perf_counter() - t0
        print(f"  {name:28s} cold {cold * 1e3:8.2f}   cached {cached * 1e3:8.3f}")

    guided = GuidedDecodingParams(json=json.dumps(MID_SCHEMA, sort_keys=True))
    run(engine, prompt, 2, 4, None)                                        # warm-up
    print(f"output tok/s, {args.max_tokens} max tokens per request:")
    for c in (int(x) for x in args.concurrency.split(",")):
        free_tps, free_n = run(engine, prompt, c, args.max_tokens, None)
        json_tps, json_n = run(engine, prompt, c, args.max_tokens, guided)
        print(f"  concurrency {c:3d}: unconstrained {free_tps:8.1f} ({free_n} tokens)   "
              f"JSON schema {json_tps:8.1f} ({json_n} tokens)   ratio {json_tps / free_tps:.3f}")


if __name__ == "__main__":
    main()
