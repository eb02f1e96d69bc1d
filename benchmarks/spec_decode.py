"""Speculative decoding (n-gram prompt lookup) on vs off, on an input-grounded "edit this text" workload.

    python benchmarks/spec_decode.py [--model GGUF] [--concurrency 1,16] [--output-len 96] [--dtype auto|float32]
                                     [--save-result F.json]

In-process LLMEngine (no HTTP), greedy, the same prompts for both settings in the same run: each prompt asks the
model to rewrite a paragraph with one word changed, so the answer mostly copies its input. Reports output tok/s,
draft acceptance rate and tokens per verification step, and checks that the greedy outputs are identical.
"""
from __future__ import annotations

import argparse
import json
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


def run(model, spec: bool, concurrency: int, output_len: int, threads: int | None, dtype: str) -> dict:
    from lmserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, SpeculativeConfig
    from lmserve.engine.llm_engine import LLMEngine
    from lmserve.sampling_params import SamplingParams
    engine = LLMEngine(EngineConfig(
        model=ModelConfig(model=model, num_threads=threads, dtype=dtype), cache=CacheConfig(num_blocks=1024),
        scheduler=SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=512),
        speculative=SpeculativeConfig(method="ngram", disable_by_batch_size=64) if spec else SpeculativeConfig()))
    ids = prompts(engine.tokenizer, concurrency)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    engine.generate(ids[:1], SamplingParams(temperature=0.0, max_tokens=4))        # warm-up
    t0 = time.perf_counter()
    outs = engine.generate(ids, params)
    dt = time.perf_counter() - t0
    s = engine.get_stats()
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"spec": spec, "concurrency": concurrency, "seconds": dt, "output_tok_s": n_out / dt,
            "acceptance_rate": s.spec_num_accepted_tokens / s.spec_num_draft_tokens if s.spec_num_draft_tokens else None,
            "tokens_per_step": s.spec_num_emitted_tokens / s.spec_num_verify_steps if s.spec_num_verify_steps else None,
            "outputs": [o.outputs[0].token_ids for o in outs]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--output-len", type=int, default=96)
    ap.add_argument("--num-threads", type=int, default=None)
    ap.add_argument("--dtype", default="auto", help="auto (the default precision policy) or float32 (exact)")
    ap.add_argument("--save-result", default=None)
    args = ap.parse_args()
    rows = []
    for c in (int(x) for x in args.concurrency.split(",")):
        off = run(args.model, False, c, args.output_len, args.num_threads, args.dtype)
        on = run(args.model, True, c, args.output_len, args.num_threads, args.dtype)
        same = off["outputs"] == on["outputs"]
        for r in (off, on):
            r.pop("outputs")
            rows.append(r)
        print(f"c={c:3d}  off {off['output_tok_s']:7.1f} tok/s  on {on['output_tok_s']:7.1f} tok/s  "
              f"x{on['output_tok_s'] / off['output_tok_s']:.2f}  acceptance {on['acceptance_rate'] or 0:.2f}  "
              f"tokens/step {on['tokens_per_step'] or 0:.2f}  greedy identical: {same}", flush=True)
    if args.save_result:
        with open(args.save_result, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
