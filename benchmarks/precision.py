"""How far each precision mode (--dtype auto's choice on this CPU, exact float32) is from the float32 reference (Hugging Face transformers on the same weights).

    python benchmarks/precision.py [--model GGUF] [--save-result FILE.json]

Teacher-forced: a fixed English + code text (~1000 tokens, from this repository's docs and Python's stdlib
docstrings) is scored as a prompt with prompt_logprobs; each lmserve configuration is compared with transformers'
float32 log-softmax at every position (mean and max |delta logprob| of the actual next token, top-1 agreement,
KL(ref || ours), perplexity). Free-running: greedy continuations of 64 tokens for 8 prompts, batched (so large
matmuls take the fast paths), compared token by token with transformers' greedy output.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))



def configs() -> dict[str, dict]:
    """--dtype auto as this CPU resolves it, the exact float32 mode, and bfloat16 where auto did not pick it."""
    from lmserve.config import ModelConfig, cpu_bf16_feature
    auto = ModelConfig(device="cpu").matmul_precision
    out = {
        f"--dtype auto (default): {auto} on this CPU (bf16: {cpu_bf16_feature() or 'none'})": {},
        "--dtype float32 (exact)": dict(dtype="float32"),
        "float32, no C++ kernels": dict(dtype="float32", attention_backend="torch", weights="float"),
    }
    if auto != "bfloat16":
        out["--dtype bfloat16"] = dict(matmul_dtype="bfloat16")
    # The rows above score with large matmuls (1024-token prefill, 8-sequence decode batches), which the bf16 GEMMs
    # take. Decode at batch <= 4 runs the quantized kernel instead, with int8 activations (VNNI) in the bf16 modes:
    # these rows force every matmul onto it (4-token prefill chunks, at most 4 sequences per step).
    small = dict(max_num_batched_tokens=4, max_num_seqs=4)
    tag = "int8 activations x VNNI" if auto == "bfloat16" else "exact"
    # NOTE: one thread: the result does not depend on it, and ~400 tiny steps do not stall on a busy neighbour
    out[f"--dtype auto, small-batch path (<= 4 rows: quantized kernel, {tag})"] = dict(_sched=small, num_threads=1)
    if auto == "bfloat16":
        out["--dtype auto, small-batch path, LMSERVE_INT8_DOT=0 (float32 activations)"] = dict(
            _sched=small, _env={"LMSERVE_INT8_DOT": "0"}, num_threads=1)
    return out


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def text_ids(tokenizer, n: int) -> list[int]:
    import argparse as ap_mod
    import json as json_mod
    with open(os.path.join(REPO, "docs", "architecture.md")) as f:
        doc = f.read()
    text = inspect.getdoc(json_mod) + "\n" + inspect.getdoc(ap_mod) + "\n" + doc
    return tokenizer.encode(text)[:n]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--skip-reference-path", action="store_true", help="leave out the pure-PyTorch float32 row")
    ap.add_argument("--save-result", default=None)
    ap.add_argument("--only", default=None, help="run only the rows whose name contains this text")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    from lmserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from lmserve.engine.llm_engine import LLMEngine
    from lmserve.model.loader import default_model_path
    from lmserve.sampling_params import SamplingParams
    from test_engine import PROMPTS, hf_greedy

    path = args.model or default_model_path()
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()
    results = {}
    ref_lp = ref_greedy = None
    print(f"CPU: {cpu_model()}", flush=True)
    for name, kw in configs().items():
        if args.skip_reference_path and kw.get("attention_backend") == "torch":
            continue
        if args.only and args.only not in name:
            continue
        kw = dict(kw)
        sched = kw.pop("_sched", dict(max_num_batched_tokens=2048))
        os.environ.update(kw.pop("_env", {"LMSERVE_INT8_DOT": "1"}))
        engine = LLMEngine(EngineConfig(model=ModelConfig(model=path, **kw), cache=CacheConfig(num_blocks=1024),
                                        scheduler=SchedulerConfig(**sched)))
        ids = text_ids(engine.tokenizer, args.tokens)
        if ref_lp is None:
            with torch.no_grad():
                ref_lp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)[:-1]
            prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
            ref_greedy = [hf_greedy(hf, p, 64) for p in prompts]
        out = engine.generate([ids], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=20))[0]
        tgt = torch.tensor(ids[1:])
        ours_tok = torch.tensor([lp.logprob for lp in out.prompt_logprobs[1:]])
        ref_tok = ref_lp[torch.arange(len(tgt)), tgt]
        delta = (ours_tok - ref_tok).abs()
        # top-1 and KL over the 20 reported alternatives (the tail beyond them carries little mass)
        top1 = sum(max(lp.top, key=lambda t: t[1])[0] == int(ref_lp[i].argmax())
                   for i, lp in enumerate(out.prompt_logprobs[1:])) / len(tgt)
        kl = []
        for i, lp in enumerate(out.prompt_logprobs[1:]):
            toks = torch.tensor([t for t, _ in lp.top])
            ours = torch.tensor([v for _, v in lp.top])
            ref = ref_lp[i, toks]
            kl.append(float((ref.exp() * (ref - ours)).sum()))
        outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
        same_tokens = sum(sum(a == b for a, b in zip(o.outputs[0].token_ids, r))
                          for o, r in zip(outs, ref_greedy))
        identical = sum(o.outputs[0].token_ids == r for o, r in zip(outs, ref_greedy))
        first_div = [next((i for i, (a, b) in enumerate(zip(o.outputs[0].token_ids, r)) if a != b), 64)
                     for o, r in zip(outs, ref_greedy)]
        results[name] = {
            "mean_abs_delta_logprob": float(delta.mean()), "max_abs_delta_logprob": float(delta.max()),
            "top1_agreement": top1, "kl_top20": sum(kl) / len(kl),
            "ppl": float((-ours_tok.mean()).exp()), "ppl_reference": float((-ref_tok.mean()).exp()),
            "greedy_identical_of_8": identical, "greedy_same_tokens_of_512": same_tokens,
            "greedy_first_divergence": first_div}
        r = results[name]
        print(f"{name:60s} mean|dlp| {r['mean_abs_delta_logprob']:.2e} max {r['max_abs_delta_logprob']:.2e} "
              f"top1 {r['top1_agreement']:.4f} KL {r['kl_top20']:.2e} ppl {r['ppl']:.3f} (ref {r['ppl_reference']:.3f}) "
              f"greedy identical {identical}/8, first divergence {first_div}", flush=True)
        del engine
    if args.save_result:
        with open(args.save_result, "w") as f:
            json.dump({"model": path, "cpu": cpu_model(), "tokens": len(ids), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
