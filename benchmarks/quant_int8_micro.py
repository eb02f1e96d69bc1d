"""The quantized kernel per SmolLM2 weight shape: float32 activations (quant_matmul.cpp, exact) vs int8
activations x AVX512-VNNI (quant_dot_vnni.cpp, the bf16 modes), same weights, alternating, best of 5.

    python benchmarks/quant_int8_micro.py [THREADS]     (default 1: the kernel itself, no OpenMP fork/join)
"""
import sys
import time

import torch

from lmserve.model import quant
from lmserve.model.loader import default_model_path
from lmserve.ops import cpu_kernels

k = cpu_kernels.load()
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
path = default_model_path()
qws = quant.load_gguf_quantized(path)
names = ['model.layers.0.self_attn.q_proj.weight', 'model.layers.0.mlp.gate_proj.weight', 'model.layers.0.mlp.down_proj.weight', 'model.embed_tokens.weight']
for rows in (1, 4, 16):
    for nm in names:
        qw = qws[nm]; tw = qw.for_int8_dot()
        x = torch.randn(rows, qw.shape[1]); out = torch.empty(rows, qw.shape[0])
        f = lambda: k.quant_matmul(out, x, qw.q, qw.d, qw.m)
        g = lambda: k.quant_matmul_int8(out, x, tw.q, tw.d, tw.m, tw.fmt == 'q4', tw.has_m)
        best = {'f': 1e9, 'i': 1e9}
        reps = 20 if 'embed' in nm else 200
        for _ in range(5):
            for key, fn in (('f', f), ('i', g)):
                t0 = time.perf_counter()
                for _ in range(reps): fn()
                best[key] = min(best[key], (time.perf_counter() - t0) / reps)
        print(f"rows={rows:2d} {nm.split('.')[-2]:12s} {qw.fmt} N={qw.shape[0]:6d} K={qw.shape[1]}: float {best['f']*1e6:8.1f} us  int8 {best['i']*1e6:8.1f} us  x{best['f']/best['i']:.2f}", flush=True)
