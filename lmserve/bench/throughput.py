"""`lmserve bench throughput`: offline throughput of the in-process engine (no HTTP).

All prompts go to `LLMEngine.generate` at once, as vLLM's `bench throughput` does; the engine's scheduler
decides the batching. Prompts are given as token ids so each has exactly --input-len tokens.
"""
from __future__ import annotations

import json
import time

from lmserve.bench.datasets import build_requests, get_tokenizer


def main(args, engine_config) -> int:
    from lmserve.engine.llm_engine import LLMEngine
    from lmserve.sampling_params import SamplingParams

    tokenizer = get_tokenizer(args.tokenizer or args.model)
    requests = build_requests(args, tokenizer, args.num_prompts)
    prompts = [tokenizer.encode(r.prompt) for r in requests]
    params = [SamplingParams(max_tokens=r.expected_output_len, temperature=0.0, ignore_eos=args.ignore_eos)
              for r in requests]

    t_load = time.perf_counter()
    engine = LLMEngine.from_config(engine_config)
    load_s = time.perf_counter() - t_load
    if args.num_warmups:
        engine.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0.0))

    t0 = time.perf_counter()
    outputs = engine.generate(prompts, params)
    elapsed = time.perf_counter() - t0

    num_prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    num_output_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    result = {
        "settings": {k: getattr(args, k) for k in ("model", "dataset", "input_len", "output_len", "prefix_len",
                                                   "num_prompts", "ignore_eos", "seed")},
        "load_s": load_s,
        "elapsed_s": elapsed,
        "num_requests": len(outputs),
        "total_prompt_tokens": num_prompt_tokens,
        "total_output_tokens": num_output_tokens,
        "request_throughput": len(outputs) / elapsed,
        "output_throughput": num_output_tokens / elapsed,
        "total_token_throughput": (num_prompt_tokens + num_output_tokens) / elapsed,
    }
    print(f"Throughput: {result['request_throughput']:.2f} requests/s, "
          f"{result['total_token_throughput']:.2f} total tokens/s, {result['output_throughput']:.2f} output tokens/s"
          f" ({len(outputs)} requests, {num_prompt_tokens} prompt + {num_output_tokens} output tokens in "
          f"{elapsed:.2f}s; engine load {load_s:.1f}s)")
    if args.save_result:
        with open(args.save_result, "w") as f:
            json.dump(result, f, indent=2)
        print(f"saved {args.save_result}")
    return 0
