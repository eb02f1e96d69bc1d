"""Offline decode throughput: lmserve's engine vs Hugging Face transformers, same weights, same run.

    python benchmarks/engine_vs_hf.py [--model PATH] [--input-len 128] [--output-len 128] [--concurrency 1,8,32,64]
    python benchmarks/engine_vs_hf.py --model HF_DIR --device cuda --dtype bfloat16     # on a GPU

For each concurrency c: c requests with ~input-len-token prompts, output-len tokens each (ignore_eos, greedy),
all submitted at once; reports output tokens/s. transformers runs `generate` on the same weights (a GGUF file or
an HF directory) in the same dtype on the same device, one request at a time (batch 1) and as one left-padded
batch of c.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch


def make_prompts(tokenizer, n: int, input_len: int) -> list[list[int]]:
    base = tokenizer.encode("The history of science is a long story of curious people asking simple questions "
                            "about the world, and slowly learning how to answer them with care. ")
    prompts = []
    for i in range(n):
        ids = tokenizer.encode(f"Request {i}: ") + base * (input_len // len(base) + 1)
        prompts.append(ids[:input_len])
    return prompts


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_lmserve(model, prompts_by_c, output_len, device="auto", dtype="auto"):
    from lmserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from lmserve.engine.llm_engine import LLMEngine
    from lmserve.sampling_params import SamplingParams
    engine = LLMEngine(EngineConfig(model=ModelConfig(model=model, device=device, dtype=dtype),
                                    cache=CacheConfig(num_blocks=2048),
                                    scheduler=SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=512)))
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    engine.generate([prompts_by_c[1][0]], SamplingParams(max_tokens=4, temperature=0))   # warm-up
    results = {}
    for c, prompts in prompts_by_c.items():
        engine.block_manager.reset_prefix_cache()   # NOTE: no cross-run prefix hits; every run prefills in full
        t0 = time.perf_counter()
        outs = engine.generate(prompts, params)
        dt = time.perf_counter() - t0
        n_out = sum(len(o.outputs[0].token_ids) for o in outs)
        results[c] = n_out / dt
        print(f"lmserve      c={c:3d}: {n_out / dt:8.1f} output tok/s ({n_out} tokens in {dt:.1f}s)", flush=True)
    return results


def bench_hf(model, prompts_by_c, output_len, device="cpu", dtype="float32"):
    from transformers import AutoModelForCausalLM
    torch_dtype = getattr(torch, dtype)
    if os.path.isdir(model):
        hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype)
    else:
        hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(model), gguf_file=os.path.basename(model),
                                                  dtype=torch_dtype)
    hf = hf.to(device).eval()

    def run(batch: list[list[int]]) -> tuple[int, float]:
        width = max(len(p) for p in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=output_len, min_new_tokens=output_len,
                              do_sample=False, pad_token_id=0)
        _sync(device)
        return (out.shape[1] - width) * len(batch), time.perf_counter() - t0

    run([prompts_by_c[1][0][:8]])   # warm-up
    results = {}
    n, dt = run(prompts_by_c[1])
    results["batch1"] = n / dt
    print(f"transformers batch=1   : {n / dt:8.1f} output tok/s", flush=True)
    for c, prompts in prompts_by_c.items():
        if c == 1:
            continue
        n, dt = run(prompts)
        results[f"padded{c}"] = n / dt
        print(f"transformers padded={c:3d}: {n / dt:8.1f} output tok/s", flush=True)
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--device", default="auto", help="auto|cpu|cuda (both engines)")
    ap.add_argument("--dtype", default="auto", help="lmserve's --dtype; transformers runs float32 unless "
                    "this names one (bfloat16, float16, float32)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--save-result", default=None)
    args = ap.parse_args()
    from lmserve.model.loader import resolve_model_path
    from lmserve.tokenizer import load_tokenizer
    model = resolve_model_path(args.model)
    tok = load_tokenizer(model)
    levels = [int(x) for x in args.concurrency.split(",")]
    prompts_by_c = {c: make_prompts(tok, c, args.input_len) for c in levels}
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch "
          f"{torch.__version__}, threads {torch.get_num_threads()}")
    from lmserve.config import resolve_device
    device = str(resolve_device(args.device))
    if device.startswith("cuda"):
        print(f"device: {torch.cuda.get_device_name(0)}, dtype {args.dtype}")
    res = {"lmserve": bench_lmserve(model, prompts_by_c, args.output_len, device, args.dtype)}
    if not args.skip_hf:
        hf_dtype = args.dtype if args.dtype in ("bfloat16", "float16", "float32") else "float32"
        res["transformers"] = bench_hf(model, prompts_by_c, args.output_len, device, hf_dtype)
        base = res["transformers"]["batch1"]
        for c in levels:
            print(f"ratio lmserve c={c} / transformers batch1: {res['lmserve'][c] / base:.2f}x")
    if args.save_result:
        with open(args.save_result, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
