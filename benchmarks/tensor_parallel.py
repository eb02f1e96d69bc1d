"""Tensor parallelism on CPU: tp=1 (one process, --num-threads T) vs tp=N (N processes, T/N threads each).

    python benchmarks/tensor_parallel.py [--model PATH] [--threads 2] [--tokens 64] [--concurrency 16]

For each setting: single-stream decode tok/s (one request, greedy, ignore_eos) and the output tok/s of
`--concurrency` requests at once, plus, for tp > 1, the time rank 0 spends inside all-reduce / all-gather per
decode step (measured around the collectives in rank 0's process: it includes waiting for the slower rank).
Default model: a random llama of SmolLM2-135M's shape but with 8 heads / 4 KV heads (SmolLM2's 9 heads do not
split 2 ways), built once under /tmp.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

from lmserve.config import CacheConfig, EngineConfig, ModelConfig
from lmserve.engine.llm_engine import LLMEngine
from lmserve.sampling_params import SamplingParams

# the tiny-model builder is a test helper, outside the package
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from model_builders import make_random_model  # noqa: E402

_comm = {"s": 0.0, "n": 0}


def _timed(fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _comm["s"] += time.perf_counter() - t0
            _comm["n"] += 1
    return wrapper


def default_model() -> str:
    path = "/tmp/lmserve-bench-tp-llama"
    if not os.path.isfile(os.path.join(path, "config.json")):
        make_random_model("llama", path, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True)
    return path


def run(model: str, tp: int, threads: int, tokens: int, concurrency: int) -> dict:
    engine = LLMEngine(EngineConfig(model=ModelConfig(model=model, num_threads=threads),
                                    cache=CacheConfig(num_blocks=1024), tp=tp))
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    prompts = [[1] + [100 + 37 * i + j for j in range(31)] for i in range(concurrency)]
    try:
        engine.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0))      # warm-up
        t0 = time.perf_counter()
        engine.generate(prompts[:1], params)
        single = tokens / (time.perf_counter() - t0)
        # decode-only step time and the collectives in it
        engine.add_request("probe", prompts[0], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
        engine.step()                                                                    # prefill
        _comm.update(s=0.0, n=0)
        t0, steps = time.perf_counter(), 0
        while engine.has_unfinished():
            engine.step()
            steps += 1
        step_ms = (time.perf_counter() - t0) / steps * 1e3
        comm_ms, comm_n = _comm["s"] / steps * 1e3, _comm["n"] / steps
        t0 = time.perf_counter()
        engine.generate(prompts, params)
        batched = concurrency * tokens / (time.perf_counter() - t0)
    finally:
        engine.shutdown()
    return dict(tp=tp, threads=threads, single=single, batched=batched, step_ms=step_ms, comm_ms=comm_ms,
                comm_n=comm_n)


def _allreduce_rank(rank: int, port: int, hidden: int, iters: int, out) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=2, rank=rank)
    x = torch.randn(1, hidden)
    for _ in range(20):
        dist.all_reduce(x)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        dist.all_reduce(x)
        times.append(time.perf_counter() - t0)
    if rank == 0:
        times.sort()
        out.put((times[len(times) // 2], sum(times) / len(times)))
    dist.destroy_process_group()


def allreduce_latency(hidden: int = 576, iters: int = 2000) -> tuple[float, float]:
    """(median, mean) seconds of one all-reduce of a [1, hidden] float32 tensor between 2 gloo processes."""
    import multiprocessing as mp

    from lmserve.engine.distributed import free_port
    ctx = mp.get_context("spawn")
    out, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_allreduce_rank, args=(r, port, hidden, iters, out)) for r in range(2)]
    for p in procs:
        p.start()
    result = out.get()
    for p in procs:
        p.join()
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--tp", default="1,2")
    ap.add_argument("--threads", type=int, default=2, help="total CPU threads; each of tp ranks gets threads / tp")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--allreduce-only", action="store_true", help="only time one [1, 576] gloo all-reduce")
    args = ap.parse_args()
    median, mean = allreduce_latency()
    print(f"one gloo all-reduce of [1, 576] float32, 2 processes: median {median * 1e6:.0f} us, "
          f"mean {mean * 1e6:.0f} us")
    if args.allreduce_only:
        return
    model = args.model or default_model()
    dist.all_reduce, dist.all_gather = _timed(dist.all_reduce), _timed(dist.all_gather)
    print(f"model {model}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    print("| tp | threads/rank | single-stream tok/s | decode step ms | collectives/step | their ms/step "
          f"| c={args.concurrency} tok/s |")
    print("|---|---|---|---|---|---|---|")
    for tp in (int(x) for x in args.tp.split(",")):
        r = run(model, tp, max(1, args.threads // tp), args.tokens, args.concurrency)
        print(f"| {tp} | {r['threads']} | {r['single']:.1f} | {r['step_ms']:.1f} | {r['comm_n']:.0f} | "
              f"{r['comm_ms']:.2f} | {r['batched']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
