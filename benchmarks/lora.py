"""Multi-LoRA throughput: c concurrent requests on SmolLM2 spread over 1, 4 or 16 distinct adapters vs the base
model alone, same engine, same run (the cost of mixing adapters in one batch).

    python benchmarks/lora.py [--model GGUF] [--concurrency 16] [--prompt-len 64] [--output-len 32] [--rank 8]
                              [--kernels auto|torch]

Adapters are written in peft's format (rank --rank, all seven projections, random A and B). Requests run through the engine (LLMEngine, the server's path without HTTP);
each round queues --concurrency greedy requests with ignore_eos and steps until all finish. The base round runs
on the same engine (adapters loaded but unused), so the figures differ only by the adapters' work.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import torch


def make_adapters(gguf: str, root: str, n: int, rank: int) -> list[str]:
    """peft-format adapters written directly (peft's key names and config; random A and B): the same files
    `get_peft_model(...).save_pretrained` writes, without building n copies of the model."""
    from safetensors.torch import save_file

    from lmserve.model.loader import load_arch_config
    a = load_arch_config(gguf)
    q, kv = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
    shapes = {"self_attn.q_proj": (q, a.hidden_size), "self_attn.k_proj": (kv, a.hidden_size),
              "self_attn.v_proj": (kv, a.hidden_size), "self_attn.o_proj": (a.hidden_size, q),
              "mlp.gate_proj": (a.intermediate_size, a.hidden_size), "mlp.up_proj": (a.intermediate_size, a.hidden_size),
              "mlp.down_proj": (a.hidden_size, a.intermediate_size)}
    paths = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        tensors = {}
        for layer in range(a.num_hidden_layers):
            for mod, (out_f, in_f) in shapes.items():
                key = f"base_model.model.model.layers.{layer}.{mod}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) * 0.02
                tensors[f"{key}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * 0.02
        path = os.path.join(root, f"lora{i}")
        os.makedirs(path)
        save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
        with open(os.path.join(path, "adapter_config.json"), "w") as f:
            json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": [
                m.split(".")[1] for m in shapes]}, f)
        paths.append(path)
    return paths


def run_round(engine, loras: list, c: int, prompt_len: int, output_len: int, tag: str) -> float:
    from lmserve.sampling_params import SamplingParams
    vocab = engine.vocab_size
    for i in range(c):
        ids = [(7919 * (i + 1) * (j + 3)) % (vocab - 100) + 50 for j in range(prompt_len)]   # no shared prefix
        params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
        params.lora = loras[i % len(loras)] if loras else None
        engine.add_request(f"{tag}-{i}", ids, params)
    t0 = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return c * output_len / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None, help="GGUF (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--adapter-counts", default="1,4,16")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--kernels", default="auto", choices=["auto", "torch"])
    args = p.parse_args()
    from lmserve.config import EngineConfig, LoraConfig, ModelConfig, SchedulerConfig
    from lmserve.engine.llm_engine import LLMEngine
    from lmserve.model.loader import default_model_path
    gguf = args.model or default_model_path()
    counts = [int(x) for x in args.adapter_counts.split(",")]
    with tempfile.TemporaryDirectory() as root:
        paths = make_adapters(gguf, root, max(counts), args.rank)
        engine = LLMEngine(EngineConfig(
            model=ModelConfig(model=gguf, dtype=args.dtype, kernels=args.kernels),
            scheduler=SchedulerConfig(max_num_seqs=args.concurrency, max_num_batched_tokens=2048),
            lora=LoraConfig(runtime_updates=True, max_loras=max(counts), max_lora_rank=args.rank)))
        manager = engine.runner.lora
        loras = [manager.load(f"lora{i}", path) for i, path in enumerate(paths)]
        run_round(engine, [], 2, 8, 4, "warm")
        result = {"model": gguf, "concurrency": args.concurrency, "prompt_len": args.prompt_len,
                  "output_len": args.output_len, "rank": args.rank, "cpu": platform.processor() or platform.machine(),
                  "threads": torch.get_num_threads(), "kernels": args.kernels, "tok_per_s": {}}
        # interleaved, twice, so a neighbour's load spike hits every configuration alike
        for rep in range(2):
            for n in [0] + counts:
                tps = run_round(engine, loras[:n], args.concurrency, args.prompt_len, args.output_len, f"r{rep}n{n}")
                result["tok_per_s"].setdefault("base" if n == 0 else f"{n} adapters", []).append(round(tps, 1))
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
