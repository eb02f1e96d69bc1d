"""The memory-bandwidth bound of single-stream decode: measured read bandwidth / bytes of weights read per token.

    python benchmarks/membw.py [FILE.gguf ...]

Bandwidth: a large read (a sum over a 2 GiB float32 array on 1 and 2 threads, best of N), the
access pattern of decode, which streams every weight matrix once per token. Bytes per token: the GGUF's matrix
bytes as stored in the file (every 2-D tensor, less the token embedding, of which one row is read per token, unless
the output head is tied to it). A server reading the file's own blocks can reach, at most, bandwidth / bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import time

# the flags that decide which kernel paths a CPU can take
ISA_FLAGS = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
             "amx_tile", "amx_int8", "amx_bf16")


def cpu_info() -> dict:
    model, flags = "?", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "?":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"model": model, "cores": os.cpu_count(), "isa": [f for f in ISA_FLAGS if f in flags]}


def read_bandwidth_gb_s(threads: int = 1, gib: float = 2.0, repeats: int = 5) -> float:
    """Best-of-`repeats` read bandwidth in GB/s (1e9 bytes/s): a sum over a `gib` GiB float32 array on `threads`
    threads. NOTE: torch's sum, not numpy's: numpy's float32 sum is pairwise and not vectorized enough to be
    memory-bound on one core (6 GB/s on a 1 MiB array in cache on the EPYC box), torch's is AVX2/AVX-512."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)    # written once: every page is resident
        best = 0.0
        for _ in range(repeats):
            t0 = time.perf_counter()
            a.sum()
            best = max(best, a.numel() * 4 / (time.perf_counter() - t0) / 1e9)
        del a
        return best
    finally:
        torch.set_num_threads(old)


def bandwidth(threads=(1, 2), gib: float = 2.0, repeats: int = 5) -> dict:
    return {f"{t}t": round(read_bandwidth_gb_s(t, gib, repeats), 2) for t in threads}


def gguf_bytes(path: str) -> dict:
    """File size, bytes of matrix weights read per decoded token, and the quant types present."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    names = {t.name for t in reader.tensors}
    tied = "output.weight" not in names
    arch_field = reader.fields["general.architecture"]
    arch = bytes(arch_field.parts[arch_field.data[0]]).decode()
    used = reader.fields.get(f"{arch}.expert_used_count")
    experts = reader.fields.get(f"{arch}.expert_count")
    per_token, types = 0, {}
    for t in reader.tensors:
        if len([d for d in t.shape if d > 1]) < 2:
            continue                                            # norms, biases: negligible, float
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + int(t.n_bytes)
        if t.name == "token_embd.weight" and not tied:
            continue                                            # a lookup: one row per token
        if t.name.endswith("_exps.weight") and used is not None:   # a token reads its top-k experts' share
            per_token += int(t.n_bytes) * int(used.parts[-1][0]) // int(experts.parts[-1][0])
            continue
        per_token += int(t.n_bytes)
    return {"file_bytes": os.path.getsize(path), "bytes_per_token": per_token, "tied_output": tied,
            "arch": arch, "matrix_bytes_by_type": types}


def bound_tok_s(bw_gb_s: float, bytes_per_token: int) -> float:
    return bw_gb_s * 1e9 / bytes_per_token


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*")
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    bw = bandwidth(gib=args.gib, repeats=args.repeats)
    out = {"cpu": cpu_info(), "loadavg": os.getloadavg(), "read_bandwidth_gb_s": bw, "models": {}}
    for m in args.models:
        g = gguf_bytes(m)
        g["bound_tok_s"] = {k: round(bound_tok_s(v, g["bytes_per_token"]), 1) for k, v in bw.items()}
        out["models"][m] = g
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
