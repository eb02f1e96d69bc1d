"""Write GGUF files of real model shapes with random weights (issue 20: memory and kernel benchmarks, tests).

The weights are random but valid GGUF blocks (random quant bytes, small fp16 scales chosen so that weights have a
standard deviation of ~0.02 and finite activations); the vocabulary, tokenizer and chat template are copied from
the bundled SmolLM2 GGUF, so the files load, tokenize and chat like a real model (the text is noise). Tensors are
generated and written one at a time: writing an 8B-shaped file needs memory for one tensor, not the file.

    python benchmarks/synthetic_gguf.py --shape llama-3.2-1b --quant Q4_0 -o /tmp/llama1b-q4_0.gguf
    python benchmarks/synthetic_gguf.py --shape qwen2.5-7b --quant Q4_K_M -o /tmp/qwen7b-q4_k_m.gguf

Importable: `write_synthetic_gguf(path, shape, quant)`, `SHAPES`, `QUANT_MIXES`.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter

# hidden, layers, ffn, heads, kv heads, tied embeddings, qkv bias, rope theta (vocabulary: SmolLM2's, 49152)
SHAPES = {
    "tiny": dict(arch="llama", hidden=256, layers=2, ffn=512, heads=4, kv_heads=2, tied=False, bias=False,
                 theta=10000.0),
    "llama-3.2-1b": dict(arch="llama", hidden=2048, layers=16, ffn=8192, heads=32, kv_heads=8, tied=True,
                         bias=False, theta=500000.0),
    "qwen2.5-3b": dict(arch="qwen2", hidden=2048, layers=36, ffn=11008, heads=16, kv_heads=2, tied=True,
                       bias=True, theta=1000000.0),
    "llama-3.1-8b": dict(arch="llama", hidden=4096, layers=32, ffn=14336, heads=32, kv_heads=8, tied=False,
                         bias=False, theta=500000.0),
    "qwen2.5-7b": dict(arch="qwen2", hidden=3584, layers=28, ffn=18944, heads=28, kv_heads=4, tied=False,
                       bias=True, theta=1000000.0),
    # phi3 files fuse q/k/v (attn_qkv) and gate/up (ffn_up) and carry LongRoPE's factors as tensors; Phi-4-mini
    # rotates 96 of each head's 128 dimensions and extends a 4k context 32x (its 200k vocabulary is SmolLM2's here)
    "phi-4-mini": dict(arch="phi3", hidden=3072, layers=32, ffn=8192, heads=24, kv_heads=8, tied=True, bias=False,
                       theta=10000.0, rotary=0.75, original_context=4096),
    # Qwen3-30B-A3B: 128 experts of ffn 768, 8 per token, in every layer (each projection of all experts one 3-D
    # tensor), 128-dim heads wider than hidden / heads, q/k norms; ~17 GiB as Q4_K_M (use `layers` to cut it)
    "qwen3-30b-a3b": dict(arch="qwen3moe", hidden=2048, layers=48, ffn=6144, heads=32, kv_heads=4, tied=False,
                          bias=False, theta=1000000.0, head_dim=128, experts=128, experts_used=8, expert_ffn=768),
    # Qwen1.5-MoE-A2.7B: 60 experts of ffn 1408 (not whole 256-blocks: K-quants fall back, as in llama.cpp), 4 per
    # token, plus a shared expert of ffn 5632 behind a sigmoid gate in every layer; q/k/v bias
    "qwen1.5-moe-a2.7b": dict(arch="qwen2moe", hidden=2048, layers=24, ffn=5632, heads=16, kv_heads=16, tied=False,
                              bias=True, theta=1000000.0, experts=60, experts_used=4, expert_ffn=1408,
                              shared_ffn=5632),
    # Mixtral 8x7B: llama.cpp's "llama" with 8 experts of ffn 14336, 2 per token, in every layer; ~26 GiB as Q4_K_M
    # (use `layers` to cut it); its 32000-token vocabulary is SmolLM2's here
    "mixtral-8x7b": dict(arch="llama", hidden=4096, layers=32, ffn=14336, heads=32, kv_heads=8, tied=False,
                         bias=False, theta=1000000.0, experts=8, experts_used=2, expert_ffn=14336),
}

# bytes per block, elements per block, byte offsets of the fp16 scale fields (d, dmin) to overwrite
_BLOCKS = {
    "Q4_0": (18, 32, (0,)), "Q4_1": (20, 32, (0, 2)), "Q5_0": (22, 32, (0,)), "Q5_1": (24, 32, (0, 2)),
    "Q8_0": (34, 32, (0,)), "Q4_K": (144, 256, (0, 2)), "Q5_K": (176, 256, (0, 2)), "Q6_K": (210, 256, (208,)),
    "Q3_K": (110, 256, (108,)), "IQ4_XS": (136, 256, (0,)), "Q2_K": (84, 256, (80, 82)), "IQ4_NL": (18, 32, (0,)),
    "IQ2_XXS": (66, 256, (0,)), "IQ2_XS": (74, 256, (0,)), "IQ2_S": (82, 256, (0,)), "IQ3_XXS": (98, 256, (0,)),
    "IQ3_S": (110, 256, (0,)), "IQ1_S": (50, 256, (0,)), "IQ1_M": (56, 256, ()),   # IQ1_M's d: random_blocks
    "MXFP4": (17, 32, ()),                         # its E8M0 exponent byte: random_blocks
    "F16": (64, 32, ()), "BF16": (64, 32, ()),     # 16-bit float matrices (random_blocks: values, not bytes)
}
# fp16 scale values giving weights of std ~0.02 with uniformly random quant bytes: (d, dmin or the Q*_1 min)
_SCALES = {
    "Q4_0": (0.0043, None), "Q4_1": (0.0043, -0.032), "Q5_0": (0.0022, None), "Q5_1": (0.0022, -0.034),
    "Q8_0": (0.00027, None), "Q4_K": (0.00009, 0.00068), "Q5_K": (0.000045, 0.0007), "Q6_K": (0.00002, None),
    "Q3_K": (0.00047, None), "IQ4_XS": (0.0000155, None), "Q2_K": (0.0016, 0.0024),
    "IQ4_NL": (0.0003, None), "IQ2_XXS": (0.0003, None), "IQ2_XS": (0.0003, None), "IQ2_S": (0.0003, None),
    "IQ3_XXS": (0.00012, None), "IQ3_S": (0.00012, None), "IQ1_S": (0.003, None), "IQ1_M": (0.003, None),
}


def _q4_k_m(name: str, layer: int, layers: int) -> str:
    """llama.cpp's Q4_K_M choice: Q6_K for the output head and for attn_v / ffn_down of the 'more bits' layers
    (the first and last eighth, every third in between), Q4_K elsewhere."""
    more_bits = layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2
    if name == "output" or (name in ("attn_v", "ffn_down") and more_bits):
        return "Q6_K"
    return "Q5_K" if name == "attn_qkv" else "Q4_K"     # a fused q/k/v gets Q5_K in llama-quant.cpp's Q4_K_M


def _iq1(name: str, layer: int, layers: int, base: str, embd: str) -> str:
    if name in ("output", "token_embd"):
        return "Q5_K" if name == "output" else embd
    if name == "ffn_down" and layer < layers // 8:
        return "Q2_K"
    return {"attn_v": "Q4_K", "attn_output": "IQ2_XXS"}.get(name, base)


# file type name -> (chooser of a matrix's type, general.file_type value)
QUANT_MIXES = {
    "Q4_0": (lambda name, layer, layers: "Q6_K" if name == "output" else "Q4_0", 2),
    "Q4_1": (lambda name, layer, layers: "Q6_K" if name == "output" else "Q4_1", 3),
    "Q5_0": (lambda name, layer, layers: "Q6_K" if name == "output" else "Q5_0", 8),
    "Q5_1": (lambda name, layer, layers: "Q6_K" if name == "output" else "Q5_1", 9),
    "Q8_0": (lambda name, layer, layers: "Q8_0", 7),
    "Q4_K_M": (_q4_k_m, 15),
    "Q5_K_M": (lambda n, i, k: "Q6_K" if _q4_k_m(n, i, k) == "Q6_K" else "Q5_K", 17),
    # llama.cpp's Q3_K_M, simplified: more bits for attn_v / attn_output / ffn_down and the head
    "Q3_K_M": (lambda n, i, k: "Q6_K" if n == "output" else
               "Q4_K" if n in ("attn_v", "attn_output", "ffn_down") else "Q3_K", 12),
    "IQ4_XS": (lambda n, i, k: "Q6_K" if n == "output" else "IQ4_XS", 30),
    "IQ4_NL": (lambda n, i, k: "Q6_K" if n == "output" else "IQ4_NL", 25),
    # llama.cpp's Q2_K, simplified: Q3_K for attn_v / ffn_down, Q6_K for the head
    "Q2_K": (lambda n, i, k: "Q6_K" if n == "output" else "Q3_K" if n in ("attn_v", "ffn_down") else "Q2_K", 10),
    # the i-quant files, simplified from llama-quant.cpp: more bits for the head (Q5_K at 2-3 bits per weight) and
    # for attn_v; IQ2_M / IQ3_M also for ffn_down
    "IQ2_XXS": (lambda n, i, k: "Q5_K" if n == "output" else "Q4_K" if n == "attn_v" else "IQ2_XXS", 19),
    "IQ2_XS": (lambda n, i, k: "Q5_K" if n == "output" else "Q4_K" if n == "attn_v" else "IQ2_XS", 20),
    "IQ2_M": (lambda n, i, k: "Q5_K" if n == "output" else "IQ3_S" if n in ("attn_v", "ffn_down") else "IQ2_S", 29),
    "IQ3_XXS": (lambda n, i, k: "Q5_K" if n == "output" else "Q4_K" if n == "attn_v" else "IQ3_XXS", 23),
    "IQ3_M": (lambda n, i, k: "Q6_K" if n == "output" else "Q4_K" if n == "attn_v" else
              "IQ4_XS" if n == "ffn_down" else "IQ3_S", 27),
    # IQ1_S / IQ1_M: Q4_K attn_v (as for GQA >= 4), Q2_K for the first eighth's ffn_down, IQ2_XXS attn_output,
    # the token embedding Q2_K / IQ3_S
    "IQ1_S": (lambda n, i, k: _iq1(n, i, k, "IQ1_S", "Q2_K"), 24),
    "IQ1_M": (lambda n, i, k: _iq1(n, i, k, "IQ1_M", "IQ3_S"), 31),
    # llama-quant.cpp's MXFP4_MOE: the experts' matrices MXFP4 (EXPERT_TYPES), every other matrix Q8_0
    "MXFP4_MOE": (lambda n, i, k: "Q8_0", 38),
    "F16": (lambda n, i, k: "F16", 1),
    "BF16": (lambda n, i, k: "BF16", 32),
}

# file type -> the type of the experts' matrices (3-D tensors), where it is not the chooser's
EXPERT_TYPES = {"MXFP4_MOE": "MXFP4"}


def random_blocks(qtype: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [rows, row_bytes]: random quant bytes, fp16 scales set so weights are ~N(0, 0.02)-sized."""
    type_size, elems, offsets = _BLOCKS[qtype]
    assert cols % elems == 0, (qtype, cols)
    if qtype in ("F16", "BF16"):
        v = (0.02 * rng.standard_normal((rows, cols))).astype(np.float32)
        half = v.astype(np.float16) if qtype == "F16" else (v.view(np.uint32) >> 16).astype(np.uint16)
        return half.view(np.uint8).reshape(rows, -1)
    blocks = rng.integers(0, 256, size=(rows, cols // elems, type_size), dtype=np.uint8)
    for off, value in zip(offsets, _SCALES.get(qtype, ())):
        blocks[:, :, off:off + 2] = np.frombuffer(np.float16(value).tobytes(), np.uint8)
    if qtype == "IQ1_M":     # its fp16 d is the top nibbles of its 4 scale words
        d = int(np.float16(_SCALES[qtype][0]).view(np.uint16))
        words = blocks[:, :, 48:56].copy().view(np.uint16)
        for k in range(4):
            words[..., k] = (words[..., k] & 0x0FFF) | (((d >> (4 * k)) & 15) << 12)
        blocks[:, :, 48:56] = words.view(np.uint8)
    if qtype == "MXFP4":     # scale 2^(120 - 128): E2M1 values doubled (rms 5.9) x 2^-8 ~ 0.023
        blocks[:, :, 0] = 120
    return blocks.reshape(rows, -1)


def _matrix_type(chooser, name: str, layer: int, layers: int, cols: int) -> str:
    qtype = chooser(name, layer, layers)
    if cols % _BLOCKS[qtype][1]:      # as llama.cpp does: a K-quant needs rows of whole 256-blocks
        qtype = ("Q8_0" if qtype == "Q6_K" else "Q5_0" if qtype == "Q5_K" else "IQ4_NL" if qtype.startswith("IQ")
                 else "Q4_0")
    return qtype


def _plan(shape: dict, quant: str, vocab: int):
    """[(gguf name, numpy dtype or qtype, (rows, cols))] in llama.cpp's tensor order."""
    chooser = QUANT_MIXES[quant][0]
    h, f, layers = shape["hidden"], shape["ffn"], shape["layers"]
    hd = shape.get("head_dim", h // shape["heads"])
    q, kv = shape["heads"] * hd, shape["kv_heads"] * hd
    # llama.cpp quantizes a tied token embedding as the output head it also is (llama-quant.cpp): Q6_K in a
    # Q4_K_M file of Llama 3.2 1B / Qwen2.5 3B, not the Q4_K of an untied model's embedding
    embd = ("output", layers) if shape["tied"] else ("token_embd", 0)
    plan = [("token_embd.weight", _matrix_type(chooser, embd[0], embd[1], layers, h), (vocab, h))]
    if shape["arch"] == "phi3":
        matrices = (("attn_qkv", q + 2 * kv, h), ("attn_output", h, q), ("ffn_up", 2 * f, h), ("ffn_down", h, f))
    elif shape.get("experts"):            # the router is F32 (below); expert matrices are [experts, rows, cols]
        e, ef = shape["experts"], shape["expert_ffn"]
        matrices = (("attn_q", q, h), ("attn_k", kv, h), ("attn_v", kv, h), ("attn_output", h, q),
                    ("ffn_gate_exps", (e, ef), h), ("ffn_up_exps", (e, ef), h), ("ffn_down_exps", (e, h), ef))
    else:
        matrices = (("attn_q", q, h), ("attn_k", kv, h), ("attn_v", kv, h), ("attn_output", h, q),
                    ("ffn_gate", f, h), ("ffn_up", f, h), ("ffn_down", h, f))
    for i in range(layers):
        p = f"blk.{i}."
        plan.append((p + "attn_norm.weight", "F32", (h,)))
        if shape["arch"] in ("qwen3", "qwen3moe"):
            plan += [(p + "attn_q_norm.weight", "F32", (hd,)), (p + "attn_k_norm.weight", "F32", (hd,))]
        if shape.get("experts"):
            plan.append((p + "ffn_gate_inp.weight", "F32", (shape["experts"], h)))
        if shape.get("shared_ffn"):           # qwen2moe's shared expert and its gate vector
            plan.append((p + "ffn_gate_inp_shexp.weight", "F32", (h,)))
            sf = shape["shared_ffn"]
            matrices = matrices[:7] + (("ffn_gate_shexp", sf, h), ("ffn_up_shexp", sf, h), ("ffn_down_shexp", h, sf))
        for name, rows, cols in matrices:
            base = name.removesuffix("_exps").removesuffix("_shexp")
            qtype = _matrix_type(chooser, base, i, layers, cols)   # as llama-quant.cpp
            if name.endswith("_exps") and quant in EXPERT_TYPES:
                qtype = EXPERT_TYPES[quant]
            plan.append((p + name + ".weight", qtype, (*rows, cols) if isinstance(rows, tuple) else (rows, cols)))
            if shape["bias"] and name in ("attn_q", "attn_k", "attn_v"):
                plan.append((p + name + ".bias", "F32", (rows,)))
        plan.append((p + "ffn_norm.weight", "F32", (h,)))
    plan.append(("output_norm.weight", "F32", (h,)))
    if not shape["tied"]:
        plan.append(("output.weight", _matrix_type(chooser, "output", layers, layers, h), (vocab, h)))
    if shape.get("original_context"):
        rotated = int(hd * shape.get("rotary", 1.0))
        plan += [(f"rope_factors_{kind}.weight", "F32", (rotated // 2,)) for kind in ("long", "short")]
    return plan


def _tensor(kind: str, dims: tuple, name: str, rng: np.random.Generator) -> np.ndarray:
    if kind != "F32":                     # 3-D (experts): the rows of all experts, one after another
        return random_blocks(kind, int(np.prod(dims[:-1])), dims[-1], rng).reshape(*dims[:-1], -1)
    if name.endswith("norm.weight"):
        return (1.0 + 0.05 * rng.standard_normal(dims)).astype(np.float32)
    if name.startswith("rope_factors_"):      # LongRoPE's per-frequency divisors: ~1 short, growing long
        grow = np.geomspace(1.0, 40.0, dims[0]) if "long" in name else 1.0 + 0.05 * np.arange(dims[0]) / dims[0]
        return np.asarray(grow, dtype=np.float32)
    return (0.02 * rng.standard_normal(dims)).astype(np.float32)


def _copy_tokenizer(writer: GGUFWriter, source: str) -> int:
    """Copy tokenizer.* fields (vocabulary, merges, special ids, chat template) from `source`; -> vocab size."""
    # NOTE: lmserve's reader, whose lazy parse of the vocabulary takes 0.3 s where gguf-py's took 3.9 s
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from lmserve.model.gguf import GGUFReader
    reader = GGUFReader(source)
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        if vtype == GGUFValueType.ARRAY:
            writer.add_key_value(key, field.contents(), vtype, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, field.contents(), vtype)
    return len(reader.fields["tokenizer.ggml.tokens"].data)


def default_tokenizer_source() -> str:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from lmserve.model.loader import default_model_path
    return default_model_path()


def write_synthetic_gguf(path: str, shape: str | dict, quant: str = "Q4_0", seed: int = 0,
                         tokenizer_from: str | None = None, context_length: int = 8192) -> int:
    """Write a random-weight GGUF of `shape` (a SHAPES key or a dict like its values) in file type `quant`
    (a QUANT_MIXES key). Returns the file size in bytes."""
    shape = SHAPES[shape] if isinstance(shape, str) else shape
    arch = shape["arch"]
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(path, arch)
    # NOTE: not the architecture's name: llama.cpp gives a model named "phi3" Phi-3's special tokens ("</s>", which
    # SmolLM2's vocabulary lacks, fails its load)
    writer.add_string("general.name", f"synthetic random weights {quant}")
    writer.add_uint32("general.file_type", QUANT_MIXES[quant][1])
    writer.add_uint32("general.quantization_version", 2)
    vocab = _copy_tokenizer(writer, tokenizer_from or default_tokenizer_source())
    h = shape["hidden"]
    rotated = int(shape.get("head_dim", h // shape["heads"]) * shape.get("rotary", 1.0))
    for key, value in (("block_count", shape["layers"]), ("context_length", context_length),
                       ("embedding_length", h), ("feed_forward_length", shape["ffn"]),
                       ("attention.head_count", shape["heads"]), ("attention.head_count_kv", shape["kv_heads"]),
                       ("vocab_size", vocab), ("rope.dimension_count", rotated)):
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(f"{arch}.rope.freq_base", shape["theta"])
    if "head_dim" in shape:
        writer.add_uint32(f"{arch}.attention.key_length", shape["head_dim"])
        writer.add_uint32(f"{arch}.attention.value_length", shape["head_dim"])
    if shape.get("experts"):
        writer.add_uint32(f"{arch}.expert_count", shape["experts"])
        writer.add_uint32(f"{arch}.expert_used_count", shape["experts_used"])
        if arch != "llama":                    # llama files give each expert's size as feed_forward_length
            writer.add_uint32(f"{arch}.expert_feed_forward_length", shape["expert_ffn"])
        if shape.get("shared_ffn"):
            writer.add_uint32(f"{arch}.expert_shared_feed_forward_length", shape["shared_ffn"])
    if shape.get("original_context"):         # LongRoPE (phi3), as llama.cpp's converter writes it
        orig = shape["original_context"]
        writer.add_uint32(f"{arch}.rope.scaling.original_context_length", orig)
        scale = context_length / orig
        writer.add_float32(f"{arch}.rope.scaling.attn_factor",
                           math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1 else 1.0)
        writer.add_uint32(f"{arch}.attention.sliding_window", shape.get("sliding_window", 0))   # 0: Phi-4
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    plan = _plan(shape, quant, vocab)
    for name, kind, dims in plan:
        if kind == "F32":
            writer.add_tensor_info(name, dims, np.dtype(np.float32), 4 * int(np.prod(dims)))
        else:
            type_size, elems, _ = _BLOCKS[kind]
            nbytes = int(np.prod(dims[:-1])) * dims[-1] // elems * type_size
            writer.add_tensor_info(name, (*dims[:-1], dims[-1] // elems * type_size), np.dtype(np.uint8), nbytes,
                                   raw_dtype=GGMLQuantizationType[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, kind, dims in plan:
        writer.write_tensor_data(_tensor(kind, dims, name, rng))
    writer.close()
    return os.path.getsize(path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    ap.add_argument("--quant", choices=sorted(QUANT_MIXES), default="Q4_0")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer-from", default=None, help="GGUF to copy the vocabulary from (default: SmolLM2)")
    ap.add_argument("-o", "--output", required=True)
    args = ap.parse_args(argv)
    size = write_synthetic_gguf(args.output, args.shape, args.quant, args.seed, args.tokenizer_from)
    print(f"{args.output}: {args.shape} {args.quant}, {size / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
