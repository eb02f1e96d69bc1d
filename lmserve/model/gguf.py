"""GGUF files: metadata -> ArchConfig, tensors -> Hugging Face-named float tensors (dequantized here with
vectorized torch code; llama.cpp's Q/K row permutation undone; tensor-parallel slices read block-aligned)."""
from __future__ import annotations

import functools
from dataclasses import replace
import math
import os

import numpy as np
import torch
from gguf import GGUFReader, GGUFValueType

from lmserve.model.arch_config import SUPPORTED_ARCHS, ArchConfig
from lmserve.model.arch_extras import gguf_arch_extras
from lmserve.model.parallel import shard_spec, slice_padded
from lmserve.startup import progress


class GGUFReader(GGUFReader):
    # NOTE: GGUFReader slices its np.memmap ~1M times while parsing the vocabulary, and every memmap slice pays
    # a Python-level __array_finalize__ (2.4 s for SmolLM2). A plain ndarray view of the same mapping parses in
    # 0.7 s; tensor data stays memory-mapped.
    @property
    def data(self):
        return self._data

    @data.setter
    def data(self, value):
        self._data = value.view(np.ndarray)


def gguf_reader(path: str) -> GGUFReader:
    # NOTE: start-up reads the same GGUF 5 times (generation defaults, arch, eos ids, weights, quantized
    # twins); parsing its metadata is ~0.7 s each, so readers are shared while the file is unchanged.
    st = os.stat(path)
    return cached_reader(os.path.abspath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def cached_reader(path: str, size: int, mtime_ns: int) -> GGUFReader:
    return GGUFReader(path)


def gguf_metadata(reader) -> dict:
    """Scalar/string metadata (large arrays such as the vocabulary are skipped)."""
    meta = {}
    for key, field in reader.fields.items():
        if field.types and field.types[0] == GGUFValueType.ARRAY and len(field.data) > 64:
            continue
        meta[key] = field.contents()
    return meta


def _f32(x: float) -> float:
    # GGUF stores floats as float32: 1e-5 becomes 9.999999747378752e-06. Use the shortest repr that round-trips.
    return float(str(np.float32(x)))


def gguf_eos_ids(meta: dict) -> tuple[int, ...]:
    ids = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def llama3_rope_scaling(freq_factors: np.ndarray, rope_theta: float, head_dim: int) -> dict:
    """Recover HF's llama3 rope_scaling dict from llama.cpp's per-frequency `rope_freqs` divisors.

    HF: wavelen < orig/high -> factor 1; wavelen > orig/low -> `factor`; between, 1/((1-s)/factor + s) with
    s = (orig/wavelen - low)/(high - low). Only the ratios orig/low and orig/high matter, so orig is fixed at
    8192 (Llama 3.x) and low/high are fitted on the smoothed frequencies, then the whole curve is checked.
    """
    f = freq_factors.astype(np.float64)
    factor = float(f.max())
    wavelen = 2 * math.pi * rope_theta ** (np.arange(0, head_dim, 2) / head_dim)
    orig = 8192

    def curve(low: float, high: float) -> np.ndarray:
        s = (orig / wavelen - low) / (high - low)
        mid = 1 / ((1 - s) / factor + s)
        return np.where(wavelen < orig / high, 1.0, np.where(wavelen > orig / low, factor, mid))

    low, high = 1.0, 4.0                                  # Llama 3.1 / 3.2 values
    mid = (f > 1 + 1e-4) & (f < factor - 1e-4)
    if not np.allclose(curve(low, high), f, rtol=1e-3) and mid.sum() >= 2:
        s = (1 / f[mid] - 1 / factor) / (1 - 1 / factor)
        slope, low = np.polyfit(s, orig / wavelen[mid], 1)
        high = low + slope
    if not np.allclose(curve(low, high), f, rtol=1e-3):
        raise NotImplementedError("GGUF rope_freqs do not follow the llama3 rope scaling rule; unsupported")
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": float(low),
            "high_freq_factor": float(high), "original_max_position_embeddings": orig}


def gguf_arch_config(reader) -> ArchConfig:
    meta = gguf_metadata(reader)
    arch = meta["general.architecture"]
    if arch not in SUPPORTED_ARCHS:
        raise NotImplementedError(f"GGUF architecture {arch!r} is not supported; supported: {SUPPORTED_ARCHS}")
    tensors = {t.name: t for t in reader.tensors}

    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    hidden, num_heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden // num_heads))
    rope_theta = _f32(get("rope.freq_base", 10000.0))
    vocab = get("vocab_size")
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in reader.fields \
            else int(tensors["token_embd.weight"].shape[1])
    rope_scaling = None
    scaling_type = get("rope.scaling.type")
    if "rope_freqs.weight" in tensors:
        rope_scaling = llama3_rope_scaling(np.asarray(tensors["rope_freqs.weight"].data), rope_theta, head_dim)
    elif scaling_type in ("linear", "yarn"):
        rope_scaling = {"rope_type": scaling_type, "factor": _f32(get("rope.scaling.factor"))}
        if get("rope.scaling.original_context_length"):
            rope_scaling["original_max_position_embeddings"] = int(get("rope.scaling.original_context_length"))
    elif scaling_type not in (None, "none"):
        raise NotImplementedError(f"GGUF rope scaling type {scaling_type!r} is not supported")
    bos = meta.get("tokenizer.ggml.bos_token_id")
    return replace(ArchConfig(
        architecture=arch,
        hidden_size=hidden,
        num_hidden_layers=int(get("block_count")),
        num_attention_heads=num_heads,
        num_key_value_heads=int(get("attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        intermediate_size=int(get("feed_forward_length")),
        vocab_size=int(vocab),
        rms_norm_eps=_f32(get("attention.layer_norm_rms_epsilon")),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=int(get("context_length")),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        sliding_window=None,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=gguf_eos_ids(meta),
    ), **gguf_arch_extras(arch, meta, reader))


# ---- dequantization (layouts: gguf/quants.py and llama.cpp ggml-quants.c) --------------------------------------
def f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()   # [n_blocks, 1]


def bits(qs: torch.Tensor, groups: int, shifts: tuple[int, ...], mask: int) -> torch.Tensor:
    """[n, groups * k] bytes -> [n, groups * len(shifts), k]: per group, (qs >> shift) & mask for each shift.

    NOTE: one elementwise op per shift into a preallocated output; broadcasting a tensor of shifts over uint8
    takes a slow path in torch (15x slower on the SmolLM2 load).
    """
    n = qs.shape[0]
    qs = qs.reshape(n, groups, -1)
    out = torch.empty(n, groups, len(shifts), qs.shape[-1], dtype=torch.uint8)
    for i, shift in enumerate(shifts):
        torch.bitwise_and(qs >> shift if shift else qs, mask, out=out[:, :, i])
    return out.view(n, groups * len(shifts), -1)


def nibbles(qs: torch.Tensor, groups: int) -> torch.Tensor:
    """Low nibbles then high nibbles of each group: [n, groups * k] -> [n, 2 * groups, k]."""
    return bits(qs, groups, (0, 4), 0x0F)


def k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins, each [n, 8, 1] float32."""
    d, m, m_d = scales.reshape(-1, 3, 4).unbind(1)
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.float().unsqueeze(-1), mn.float().unsqueeze(-1)


def _dq_q8_0(b):
    return b[:, 2:].view(torch.int8).float().mul_(f16(b, 0))


def _dq_q4_0(b):
    q = nibbles(b[:, 2:], 1).view(b.shape[0], 32).float().sub_(8)
    return q.mul_(f16(b, 0))


def _dq_q4_1(b):
    q = nibbles(b[:, 4:], 1).view(b.shape[0], 32).float()
    return q.mul_(f16(b, 0)).add_(f16(b, 2))


def _dq_q5_0(b):
    n = b.shape[0]
    qh = bits(b[:, 2:6], 1, tuple(range(8)), 1).transpose(1, 2).reshape(n, 32)   # bit j of the 32-bit qh
    q = nibbles(b[:, 6:], 1).view(n, 32).bitwise_or_(qh.bitwise_left_shift_(4))
    return q.float().sub_(16).mul_(f16(b, 0))


def _dq_q5_1(b):
    n = b.shape[0]
    qh = bits(b[:, 4:8], 1, tuple(range(8)), 1).transpose(1, 2).reshape(n, 32)
    q = nibbles(b[:, 8:], 1).view(n, 32).bitwise_or_(qh.bitwise_left_shift_(4))
    return q.float().mul_(f16(b, 0)).add_(f16(b, 2))


def _dq_q4_k(b):
    n = b.shape[0]
    sc, mn = k_scales(b[:, 4:16])
    d, dm = f16(b, 0).unsqueeze(-1) * sc, f16(b, 2).unsqueeze(-1) * mn    # [n, 8, 1]
    return nibbles(b[:, 16:], 4).float().mul_(d).sub_(dm).view(n, 256)


def _dq_q5_k(b):
    n = b.shape[0]
    sc, mn = k_scales(b[:, 4:16])
    d, dm = f16(b, 0).unsqueeze(-1) * sc, f16(b, 2).unsqueeze(-1) * mn
    qh = bits(b[:, 16:48], 1, tuple(range(8)), 1)                           # [n, 8, 32]: bit 4 of each q
    q = nibbles(b[:, 48:], 4).bitwise_or_(qh.bitwise_left_shift_(4))
    return q.float().mul_(d).sub_(dm).view(n, 256)


def _dq_q6_k(b):
    n = b.shape[0]
    d = (f16(b, 208) * b[:, 192:208].view(torch.int8).float()).view(n, 16, 1)
    ql = nibbles(b[:, :128], 2).view(n, 8, 32)
    qh = bits(b[:, 128:192], 2, (0, 2, 4, 6), 3).view(n, 8, 32)
    q = ql.bitwise_or_(qh.bitwise_left_shift_(4)).view(torch.int8).float().sub_(32)
    return q.view(n, 16, 16).mul_(d).view(n, 256)


# type name -> (elements per block, bytes per block, dequantizer of [n_blocks, bytes] uint8 -> [n_blocks, elems])
QUANTS = {
    "Q8_0": (32, 34, _dq_q8_0), "Q4_0": (32, 18, _dq_q4_0), "Q4_1": (32, 20, _dq_q4_1),
    "Q5_0": (32, 22, _dq_q5_0), "Q5_1": (32, 24, _dq_q5_1),
    "Q4_K": (256, 144, _dq_q4_k), "Q5_K": (256, 176, _dq_q5_k), "Q6_K": (256, 210, _dq_q6_k),
}
SUPPORTED_GGML_TYPES = ("F32", "F16", "BF16", *QUANTS)


def dequantize(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw GGUF tensor bytes (any numpy dtype/shape) -> float32 tensor of `shape` (row-major, HF order)."""
    data = torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8).reshape(-1).copy())
    if type_name == "F32":
        out = data.view(torch.float32)
    elif type_name == "F16":
        out = data.view(torch.float16).float()
    elif type_name == "BF16":
        out = data.view(torch.bfloat16).float()
    elif type_name in QUANTS:
        _, type_size, fn = QUANTS[type_name]
        out = fn(data.view(-1, type_size))
    else:
        raise NotImplementedError(
            f"GGUF tensor type {type_name} is not supported; supported: {', '.join(SUPPORTED_GGML_TYPES)}")
    return out.reshape(shape)


# ---- GGUF tensors -> HF names ---------------------------------------------------------------------------------
_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_GGUF_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


# Gemma 3 norms around both attention and MLP; llama.cpp's "ffn_norm" is its pre-feed-forward norm
_QK_NORM_NAMES = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_GGUF_ARCH_LAYER_NAMES = {
    "gemma3": {**_GGUF_LAYER_NAMES, **_QK_NORM_NAMES, "ffn_norm": "pre_feedforward_layernorm",
               "post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm"},
    "qwen3": {**_GGUF_LAYER_NAMES, **_QK_NORM_NAMES},
}


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    base, _, suffix = gguf_name.rpartition(".")           # suffix: weight | bias
    parts = base.split(".")
    layer_names = _GGUF_ARCH_LAYER_NAMES.get(arch, _GGUF_LAYER_NAMES)
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in layer_names:
        return f"model.layers.{parts[1]}.{layer_names[parts[2]]}.{suffix}"
    if base in _GGUF_GLOBAL_NAMES:
        return f"{_GGUF_GLOBAL_NAMES[base]}.{suffix}"
    if base == "rope_freqs":                               # folded into ArchConfig.rope_scaling
        return None
    raise NotImplementedError(f"GGUF tensor {gguf_name!r} has no Hugging Face counterpart here")


def unpermute(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    # NOTE: llama.cpp's converter reorders Q/K rows of llama-family models per head from HF's rotate_half layout
    # [x0..x(d/2-1), x(d/2)..] to interleaved pairs [x0, x(d/2), x1, ...]; this is the inverse.
    return w.reshape(num_heads, -1, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_slice(t, spec: tuple[int, int, int] | None) -> torch.Tensor:
    """Dequantize a GGUF tensor, or only a tensor-parallel slice of it: rows are whole runs of blocks, and a
    column range aligned to the block size is a range of blocks, so neither dequantizes the rest."""
    shape = tuple(int(x) for x in reversed(t.shape))
    type_name = t.tensor_type.name
    if spec is None:
        return dequantize(t.data, type_name, shape)
    dim, start, size = spec
    end = min(start + size, shape[dim])
    elems, nbytes = QUANTS[type_name][:2] if type_name in QUANTS else (1, None)
    raw = np.ascontiguousarray(t.data).view(np.uint8).reshape(shape[0], -1)     # [rows, bytes per row]
    if dim == 0:
        w = dequantize(raw[start:end], type_name, (max(0, end - start), *shape[1:]))
    elif len(shape) == 2 and start % elems == 0 and end % elems == 0:
        per_block = nbytes or raw.shape[1] // shape[1]
        blocks = raw.reshape(shape[0], -1, per_block)[:, start // elems:end // elems]
        w = dequantize(blocks, type_name, (shape[0], end - start))
    else:
        w = dequantize(t.data, type_name, shape).narrow(dim, start, end - start)
    return slice_padded(w, dim, 0, size)


def gguf_state_dict(reader, cfg: ArchConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    state = {}
    for t in progress(reader.tensors, "loading weights", unit="tensor"):
        name = hf_name(t.name, cfg.architecture)
        if name is None:
            continue
        w = gguf_slice(t, shard_spec(name, cfg))
        if cfg.architecture == "gemma3" and name.endswith("norm.weight"):
            w = w - 1      # llama.cpp stores Gemma's norm multiplier 1 + w; HF names mean w
        if cfg.architecture in ("llama", "mistral") and (".q_proj." in name or ".k_proj." in name):
            w = unpermute(w, w.shape[0] // cfg.head_dim)     # per head, so a slice of whole heads works too
        state[name] = w.to(dtype)
    return state
