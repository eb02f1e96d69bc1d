"""Where one batch-1 decode step's time goes: per op (gguf_matmul per weight shape, attention, norms, RoPE),
logits, sampling, and the Python around them, by wrapping the runner's op table and phases with timers.

    python benchmarks/decode_profile.py [--dtype auto|float32] [--threads 1,2] [--int8-dot on,off] [--steps 100]
        [--prefill 512] [--fused on,off] [--batch 16]

Each (threads, int8-dot) configuration runs in turn on the same engine (the model loads once per dtype), with
one 128-token prompt prefilled and then --steps decode steps timed. The timers cost ~0.1 us per call (~250 calls
per step); "python + glue" is what is left of the step after the timed parts. Comparing --threads 1 with 2 shows
which ops gain from the second thread and which mostly pay OpenMP's fork/join. --prefill N profiles the step that
prefills one N-token prompt instead (best of 3 prompts, one step each: the step budget is raised to N).
"""
from __future__ import annotations

import argparse
import collections
import functools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from engine_vs_hf import make_prompts  # noqa: E402

from lmserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig  # noqa: E402
from lmserve.engine.llm_engine import LLMEngine  # noqa: E402
from lmserve.model.moe import SparseMoeBlock  # noqa: E402
from lmserve.sampling_params import SamplingParams  # noqa: E402

TIMES: dict[str, float] = collections.defaultdict(float)


def timed(key_of, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMES[key_of(*args, **kwargs)] += time.perf_counter() - t0
    return wrapper


def instrument(engine: LLMEngine) -> None:
    runner = engine.runner
    table = runner.ops
    for name, fn in list(table.impls.items()):
        if name == "gguf_matmul":
            def key(x, w, bias=None, int8=False, *a, **k):
                parts = w if isinstance(w, (list, tuple)) else [w]
                n, kk = sum(p.shape[0] for p in parts), parts[0].shape[1]
                qt = "+".join(p.qtype for p in parts)
                return f"gguf_matmul {'head ' if n > 20000 else ''}{n}x{kk} ({qt}{', int8' if int8 else ''})"
            table.__dict__[name] = timed(key, fn)
        else:
            table.__dict__[name] = timed(lambda *a, _n=name, **k: _n, fn)
    if runner.fused is not None:
        runner.fused = timed(lambda *a, **k: "decoder_stack (every layer, one C++ call)", runner.fused)
    for block in moe_blocks(engine):
        block.kernel = timed(lambda *a, **k: "moe_mlp (a MoE block, one C++ call)", block.kernel)
    runner.prepare = timed(lambda *a, **k: "runner.prepare (inputs, metadata)", runner.prepare)
    runner.sample = timed(lambda *a, **k: "runner.sample (sampler)", runner.sample)
    runner.forward = timed(lambda *a, **k: "FORWARD", runner.forward)
    engine.step = timed(lambda *a, **k: "STEP", engine.step)


def moe_blocks(engine: LLMEngine) -> list:
    """The sparse MoE blocks that got their one-call kernel (model/fused_decode.py attach_moe_kernels)."""
    return [m for m in engine.runner.model.modules() if isinstance(m, SparseMoeBlock) and m.kernel is not None]


def profile(engine: LLMEngine, steps: int, tag: str, batch: int = 1) -> None:
    for i, prompt in enumerate(make_prompts(engine.tokenizer, batch, 128)):
        engine.add_request(f"{tag}-{i}", prompt, SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True))
    while engine.scheduler.waiting or any(s.num_output_tokens == 0 for s in engine.scheduler.running):
        engine.step()
    for _ in range(3):
        engine.step()
    TIMES.clear()
    for _ in range(steps):
        engine.step()
    engine.abort_all()
    t = {k: v / steps * 1000 for k, v in TIMES.items()}
    step, forward = t.pop("STEP"), t.pop("FORWARD")
    ops_ms = sum(v for k, v in t.items() if not k.startswith("runner."))
    rows = sorted(t.items(), key=lambda kv: -kv[1])
    rows += [("forward: python + glue (embedding, views, logits gather)", forward - ops_ms),
             ("engine: scheduler + detokenizer + python", step - forward - t["runner.prepare (inputs, metadata)"]
              - t["runner.sample (sampler)"])]
    print(f"\n### {tag}: step of {batch} sequence(s) {step:.2f} ms = {batch * 1000 / step:.1f} tok/s "
          f"(uptime: {os.getloadavg()[0]:.2f})")
    print("| part | ms / step | share |\n|---|---:|---:|")
    for k, v in rows:
        print(f"| {k} | {v:.3f} | {100 * v / step:.1f}% |")
    sys.stdout.flush()


def profile_prefill(engine: LLMEngine, n: int, tag: str) -> None:
    best = None
    for i, prompt in enumerate(make_prompts(engine.tokenizer, 3, n)):
        engine.add_request(f"{tag}-{i}", prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        TIMES.clear()
        while engine.has_unfinished():
            engine.step()
        if best is None or TIMES["STEP"] < best["STEP"]:
            best = dict(TIMES)
    t = {k: v * 1000 for k, v in best.items()}
    step, forward = t.pop("STEP"), t.pop("FORWARD")
    ops_ms = sum(v for k, v in t.items() if not k.startswith("runner."))
    print(f"\n### {tag}: prefill of {n} tokens {step:.0f} ms = {n / step * 1000:.0f} tok/s "
          f"(uptime: {os.getloadavg()[0]:.2f})")
    print("| part | ms | share |\n|---|---:|---:|")
    for k, v in sorted(t.items(), key=lambda kv: -kv[1]) + [("forward: python + glue", forward - ops_ms)]:
        print(f"| {k} | {v:.1f} | {100 * v / step:.1f}% |")
    sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", default="2,1")
    ap.add_argument("--int8-dot", default="on")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--prefill", type=int, default=0, help="profile an N-token prefill instead of decode steps")
    ap.add_argument("--batch", type=int, default=1, help="decode steps of this many sequences (c=N serving)")
    ap.add_argument("--fused", default="on", help="decode layers in one C++ call (model/fused_decode.py) and each MoE "
                    "block's own kernel, off = the modules; a list (on,off,on,off) alternates them on the same engine")
    ap.add_argument("--gguf-repack", default="auto", help="auto, none, or a list (auto,none): one engine each")
    args = ap.parse_args()
    for int8, repack in ((i, r) for i in args.int8_dot.split(",") for r in args.gguf_repack.split(",")):
        engine = LLMEngine(EngineConfig(model=ModelConfig(model=args.model, dtype=args.dtype, gguf_repack=repack,
                                                          quant_activations="int8" if int8 == "on" else "float"),
                                        # no prefix cache: a later --fused arm would find the same
                                        # prompts' blocks cached and prefill only their last token
                                        cache=CacheConfig(num_blocks=512, enable_prefix_caching=False),
                                        scheduler=SchedulerConfig(max_num_batched_tokens=max(512, args.prefill))))
        instrument(engine)
        fused = engine.runner.fused
        moe = [(block, block.kernel) for block in moe_blocks(engine)]
        for threads, on in ((int(n), f) for n in args.threads.split(",") for f in args.fused.split(",")):
            torch.set_num_threads(threads)
            engine.runner.fused = fused if on == "on" else None
            for block, kernel in moe:
                block.kernel = kernel if on == "on" else None
            run = functools.partial(profile_prefill, engine, args.prefill) if args.prefill else \
                functools.partial(profile, engine, args.steps, batch=args.batch)
            run(f"--dtype {args.dtype} ({engine.runner.matmul_precision} matmuls), int8-dot {int8}, repack {repack}, "
                f"{threads} threads, "
                f"fused {on if fused is not None or moe else 'n/a'}")


if __name__ == "__main__":
    main()
