"""Speculative decoding (n-gram prompt lookup) on vs off, on an input-grounded "edit this text" workload.

    python benchmarks/spec_decode.py [--model GGUF] [--concurrency 1,16] [--output-len 96] [--dtype auto|float32]
                                     [--num-speculative-tokens 4] [--rounds 2] [--save-result F.json]

In-process LLMEngine (no HTTP), greedy, the same prompts for both settings in the same run (two engines in
one process, off and on passes alternating): each prompt asks the
model to rewrite a paragraph with one word changed, so the answer mostly copies its input. Reports output tok/s,
draft acceptance rate and tokens per verification step, and checks that the greedy outputs are identical.
"""
from __future__ import annotations

import argparse
import json
import os
import time

PARAGRAPHS = [
    "The library opens at nine in the morning and closes at six in the evening. Visitors may borrow up to five "
    "books at a time, and each loan lasts three weeks. Late returns cost ten cents a day.",
    "Our team meets every Monday at ten to review the week's plan. Each member reports what they finished, what "
    "is blocked, and what they will do next. Notes are posted in the shared folder by noon.",
    "def area(width, height):\n    if width < 0 or height < 0:\n        raise ValueError('negative size')\n"
    "    return width * height\n\n\ndef perimeter(width, height):\n    return 2 * (width + height)\n",
    "The train leaves the central station at half past seven and arrives in the harbour town two hours later. "
    "Tickets can be bought on board, but seats cannot be reserved on weekends.",
]
EDITS = ["change the first number word to another number", "replace 'the' in the first sentence with 'this'",
         "rename the first function to 'surface'", "change 'seven' to 'eight'"]


def prompts(tokenizer, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        text, edit = PARAGRAPHS[i % len(PARAGRAPHS)], EDITS[i % len(EDITS)]
        msg = f"Rewrite the following text; {edit}; keep everything else exactly the same.\n\n{text}"
        out.append(tokenizer.encode_chat([{"role": "user", "content": msg}]))
    return out


def make_engine(model, spec: bool, threads: int | None, dtype: str, k: int, disable_by: int):
    from lmserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, SpeculativeConfig
    from lmserve.engine.llm_engine import LLMEngine
    return LLMEngine(EngineConfig(
        model=ModelConfig(model=model, num_threads=threads, dtype=dtype), cache=CacheConfig(num_blocks=1024),
        scheduler=SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=512),
        speculative=SpeculativeConfig(method="ngram", num_speculative_tokens=k, disable_by_batch_size=disable_by)
        if spec else SpeculativeConfig()))


def run(engine, concurrency: int, output_len: int) -> dict:
    """One timed pass of `concurrency` prompts; spec counters are the difference over this pass."""
    from lmserve.sampling_params import SamplingParams
    ids = prompts(engine.tokenizer, concurrency)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    s0 = engine.get_stats()
    t0 = time.perf_counter()
    outs = engine.generate(ids, params)
    dt = time.perf_counter() - t0
    s = engine.get_stats()
    draft = s.spec_num_draft_tokens - s0.spec_num_draft_tokens
    steps = s.spec_num_verify_steps - s0.spec_num_verify_steps
    return {"seconds": dt, "tokens": sum(len(o.outputs[0].token_ids) for o in outs), "draft": draft,
            "accepted": s.spec_num_accepted_tokens - s0.spec_num_accepted_tokens,
            "emitted": s.spec_num_emitted_tokens - s0.spec_num_emitted_tokens, "verify_steps": steps,
            "outputs": [o.outputs[0].token_ids for o in outs]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--output-len", type=int, default=96)
    ap.add_argument("--num-threads", type=int, default=None)
    ap.add_argument("--num-speculative-tokens", type=int, default=4)
    ap.add_argument("--disable-by-batch-size", type=int, default=8,
                    help="the engine's auto-off threshold (8 = the default; 64 measures speculation itself at c=16)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="off/on passes alternate this many times (a busy neighbour then slows both alike)")
    ap.add_argument("--dtype", default="auto", help="auto (the default precision policy) or float32 (exact)")
    ap.add_argument("--save-result", default=None)
    args = ap.parse_args()
    engines = {False: make_engine(args.model, False, args.num_threads, args.dtype, args.num_speculative_tokens,
                                  args.disable_by_batch_size),
               True: make_engine(args.model, True, args.num_threads, args.dtype, args.num_speculative_tokens,
                                  args.disable_by_batch_size)}
    from lmserve.sampling_params import SamplingParams
    for e in engines.values():   # warm-up: kernels, allocator, first-call paths
        e.generate(prompts(e.tokenizer, 1), SamplingParams(temperature=0.0, max_tokens=8))
    rows = []
    for c in (int(x) for x in args.concurrency.split(",")):
        tot = {False: [], True: []}
        for _ in range(args.rounds):
            for spec in (False, True):
                tot[spec].append(run(engines[spec], c, args.output_len))
        off, on = ({k: sum(r[k] for r in tot[spec]) for k in ("seconds", "tokens", "draft", "accepted", "emitted",
                                                              "verify_steps")} for spec in (False, True))
        same = all(a["outputs"] == b["outputs"] for a, b in zip(tot[False], tot[True]))
        off_tps, on_tps = off["tokens"] / off["seconds"], on["tokens"] / on["seconds"]
        acc = on["accepted"] / on["draft"] if on["draft"] else 0.0
        tps = on["emitted"] / on["verify_steps"] if on["verify_steps"] else 0.0
        load = os.getloadavg()[0]
        rows.append({"concurrency": c, "dtype": args.dtype, "k": args.num_speculative_tokens,
                     "disable_by_batch_size": args.disable_by_batch_size,
                     "rounds": args.rounds, "off_tok_s": off_tps, "on_tok_s": on_tps, "speedup": on_tps / off_tps,
                     "acceptance_rate": acc, "tokens_per_step": tps, "greedy_identical": same, "load1": load})
        print(f"c={c:3d}  off {off_tps:7.1f} tok/s  on {on_tps:7.1f} tok/s  x{on_tps / off_tps:.2f}  "
              f"acceptance {acc:.2f}  tokens/step {tps:.2f}  greedy identical: {same}  (load {load:.2f})",
              flush=True)
    if args.save_result:
        with open(args.save_result, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
