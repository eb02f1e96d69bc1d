"""GGUF files: metadata -> ArchConfig, tensors -> Hugging Face-named float tensors (dequantized here with
vectorized torch code; llama.cpp's Q/K row permutation undone; tensor-parallel slices read block-aligned)."""
from __future__ import annotations

import collections.abc
import contextlib
import functools
import inspect
import logging
from dataclasses import replace
import math
import os
import struct

import gguf as gguf_py
import numpy as np
import torch
from gguf import GGUFReader, GGUFValueType
from gguf.gguf_reader import ReaderField

from lmserve.model.arch_config import SUPPORTED_ARCHS, ArchConfig
from lmserve.model.arch_extras import gguf_arch_extras
from lmserve.model.parallel import shard_spec, slice_padded
from lmserve.ops.gguf_blocks import (QUANTS, SUPPORTED_GGML_TYPES, bits, dequantize, f16,  # noqa: F401
                                     k_scales, nibbles)
from lmserve.startup import progress


def _lazy_parse_fits() -> bool:
    """Whether gguf-py's private parser API is the one the lazy parse below overrides (gguf 0.10-0.19): a release
    that changes it gets its own eager parse, slower on large vocabularies but never a wrong one."""
    want = {"_get_str": ["self", "offset"], "_get": ["self", "offset", "dtype", "count", "override_order"],
            "_push_field": ["self", "field", "skip_sum"], "_get_field_parts": ["self", "orig_offs", "raw_type"],
            "_build_fields": ["self", "offs", "count"]}
    try:
        return isinstance(GGUFReader.gguf_scalar_to_np, dict) and \
            list(inspect.signature(ReaderField).parameters) == ["offset", "name", "parts", "data", "types"] and \
            all(list(inspect.signature(getattr(GGUFReader, name)).parameters) == params
                for name, params in want.items())
    except (AttributeError, TypeError, ValueError):
        return False


LAZY_PARSE = _lazy_parse_fits()
if not LAZY_PARSE:
    logging.getLogger(__name__).warning("gguf-py's reader internals changed: GGUF metadata is parsed eagerly "
                                        "(slower start-up on large vocabularies)")


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

    # NOTE: gguf-py parses an array element by element (a length and a data view per string, one view per
    # number): ~800k views for Gemma 3's 262k-token vocabulary, 6.4 s of a 10 s start. Long arrays of strings or
    # numbers get their parts lazily here instead: the same parts at the same indices, made when read.
    def _build_fields(self, offs: int, count: int) -> int:
        # gguf-py's loop, except that it prefixes a lazy array's parts instead of copying them into a list
        if not LAZY_PARSE:
            return super()._build_fields(offs, count)
        for _ in range(count):
            orig_offs = offs
            klen, kdata = self._get_str(offs)
            offs += int(klen.nbytes + kdata.nbytes)
            raw_type = self._get(offs, np.uint32)
            offs += int(raw_type.nbytes)
            head = [klen, kdata, raw_type]
            size, parts, idxs, types = self._get_field_parts(offs, raw_type[0])
            parts = parts.prefixed(head) if isinstance(parts, _ArrayParts) else head + parts
            self._push_field(ReaderField(orig_offs, str(bytes(kdata), encoding="utf-8"), parts,
                                         [i + len(head) for i in idxs], types), skip_sum=True)
            offs += size
        return offs

    def _get_field_parts(self, orig_offs: int, raw_type: int):
        if not LAZY_PARSE or raw_type != GGUFValueType.ARRAY or self.byte_order != "I":
            return super()._get_field_parts(orig_offs, raw_type)
        itype, alen = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
        n, sub = int(alen[0]), GGUFValueType(int(itype[0]))
        nptype = self.gguf_scalar_to_np.get(sub)
        if n <= 64 or (sub != GGUFValueType.STRING and nptype is None):
            return super()._get_field_parts(orig_offs, raw_type)
        offs = orig_offs + 12
        if sub == GGUFValueType.STRING:
            starts = np.empty(n, dtype=np.int64)
            buf, unpack = memoryview(self.data), _U64.unpack_from
            for i in range(n):
                starts[i] = offs
                offs += 8 + unpack(buf, offs)[0]
        else:
            starts = offs + np.arange(n, dtype=np.int64) * np.dtype(nptype).itemsize
            offs = int(offs + n * np.dtype(nptype).itemsize)
        parts = _ArrayParts([itype, alen], self.data, starts, nptype)
        step = 2 if nptype is None else 1
        return offs - orig_offs, parts, list(range(2 + step - 1, 2 + step * n, step)), [GGUFValueType.ARRAY, sub]


_U64 = struct.Struct("<Q")


class _ArrayParts(collections.abc.Sequence):
    """An array field's parts as gguf-py lists them ([item type, length] + per element: [string length, bytes]
    or [number]), each a view of the file's bytes made on access. Holds the bytes, not the reader: no reference
    cycle, so dropping the reader (release_readers) unmaps the file at once, as it did with gguf-py's lists."""

    def __init__(self, head: list, data: np.ndarray, starts: np.ndarray, nptype):
        self.head, self.data, self.starts, self.nptype = head, data, starts, nptype
        self.step = 2 if nptype is None else 1

    def __len__(self) -> int:
        return len(self.head) + self.step * len(self.starts)

    def __getitem__(self, j):
        if isinstance(j, slice):
            return [self[i] for i in range(*j.indices(len(self)))]
        j = j + len(self) if j < 0 else j
        if j < len(self.head):
            return self.head[j]
        k, r = divmod(j - len(self.head), self.step)
        at = int(self.starts[k])
        if self.nptype is not None:
            return self.data[at:at + np.dtype(self.nptype).itemsize].view(self.nptype)
        slen = self.data[at:at + 8].view(np.uint64)
        return slen if r == 0 else self.data[at + 8:at + 8 + int(slen[0])]

    def prefixed(self, head: list) -> "_ArrayParts":
        return _ArrayParts(list(head) + self.head, self.data, self.starts, self.nptype)


def gguf_reader(path: str) -> GGUFReader:
    # NOTE: start-up reads the same GGUF 5 times (generation defaults, arch, eos ids, weights, quantized
    # twins); readers are shared while the file is unchanged.
    st = os.stat(path)
    return cached_reader(os.path.abspath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def cached_reader(path: str, size: int, mtime_ns: int) -> GGUFReader:
    return GGUFReader(path)


def release_readers() -> None:
    """Drop the readers start-up shared: nothing reads their metadata once the model and tokenizer are built
    (with gguf-py's eager parse a vocabulary was ~1M numpy objects, 280 MiB for Gemma 3's 262k tokens; parts are
    lazy now, but views made while loading may still be held). Tensor data the model serves from the file stays
    mapped through its own views."""
    cached_reader.cache_clear()


@contextlib.contextmanager
def lazy_reader_for_transformers():
    """transformers' one-time GGUF tokenizer conversion with the lazy parse above: it builds gguf-py's own reader
    (`from gguf import GGUFReader` at the call), whose eager parse of the vocabulary was 3.4 of the 4.2 s a new
    SmolLM2-vocabulary file took to convert on a 2-core VM, 10.6 of Gemma 3's 15.6 s (the same tokenizer comes
    out: tests/test_tokenizer.py). The subclass reads the same fields, so another thread that builds a reader
    meanwhile gets one that reads alike."""
    if not LAZY_PARSE:
        yield
        return
    plain, gguf_py.GGUFReader = gguf_py.GGUFReader, GGUFReader
    try:
        yield
    finally:
        gguf_py.GGUFReader = plain


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


# llama.cpp's architecture names that differ from HF's model_type (the metadata keys keep llama.cpp's)
_GGUF_ARCH_ALIASES = {"qwen3moe": "qwen3_moe", "qwen2moe": "qwen2_moe"}
# llama.cpp's converter reorders the Q/K rows of these (see unpermute); Mixtral's files say "llama"
_PERMUTED_QK = ("llama", "mistral", "mixtral")


def is_moe_tensor(name: str) -> bool:
    """A router or an expert matrix: all experts stacked ('blk.0.ffn_gate_exps.weight') or one expert per tensor,
    as llama.cpp wrote Mixtral files before April 2024 ('blk.0.ffn_gate.3.weight')."""
    parts = name.split(".")
    return name.endswith(("_exps.weight", "ffn_gate_inp.weight")) or (len(parts) == 5 and parts[3].isdigit())


def permuted_qk(name: str, cfg) -> bool:
    """Whether this HF-named matrix holds Q or K rows in llama.cpp's interleaved order (unpermute undoes it)."""
    return cfg.architecture in _PERMUTED_QK and (".q_proj." in name or ".k_proj." in name)


def gguf_arch_config(reader) -> ArchConfig:
    meta = gguf_metadata(reader)
    file_arch = meta["general.architecture"]
    arch = _GGUF_ARCH_ALIASES.get(file_arch, file_arch)
    if arch not in SUPPORTED_ARCHS:
        raise NotImplementedError(f"GGUF architecture {file_arch!r} is not supported; supported: {SUPPORTED_ARCHS}")
    tensors = {t.name: t for t in reader.tensors}
    if any(is_moe_tensor(name) for name in tensors):
        if arch == "llama":               # Mixtral and the Llama-family MoE merges: llama.cpp's "llama" + experts
            arch = "mixtral"
        elif arch not in ("qwen2_moe", "qwen3_moe"):
            raise NotImplementedError(f"GGUF file of a {file_arch!r} mixture-of-experts model (router and expert "
                                      "tensors): MoE GGUF files are supported for llama (Mixtral), qwen2moe and "
                                      "qwen3moe")

    def get(key, default=None):
        return meta.get(f"{file_arch}.{key}", default)

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


# ---- GGUF tensors -> HF names ---------------------------------------------------------------------------------
_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_GGUF_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


# Gemma 3 norms around both attention and MLP; llama.cpp's "ffn_norm" is its pre-feed-forward norm
_QK_NORM_NAMES = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
# MoE layers: the router, and each projection of all experts stacked in one 3-D tensor [experts, rows, cols]
_MOE_NAMES = {"ffn_gate_inp": "mlp.gate", "ffn_gate_exps": "mlp.experts.gate_proj",
              "ffn_up_exps": "mlp.experts.up_proj", "ffn_down_exps": "mlp.experts.down_proj"}
# older Mixtral files: one tensor per expert and projection, 'blk.0.ffn_gate.3.weight'
_PER_EXPERT_NAMES = {"ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj"}
_GGUF_ARCH_LAYER_NAMES = {
    "gemma3": {**_GGUF_LAYER_NAMES, **_QK_NORM_NAMES, "ffn_norm": "pre_feedforward_layernorm",
               "post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm"},
    "qwen3": {**_GGUF_LAYER_NAMES, **_QK_NORM_NAMES},
    "qwen3_moe": {**_GGUF_LAYER_NAMES, **_QK_NORM_NAMES, **_MOE_NAMES},
    "mixtral": {**_GGUF_LAYER_NAMES, **_MOE_NAMES},
    # Qwen2-MoE's shared expert and its sigmoid gate (a [hidden] vector in the file, HF's [1, hidden] Linear)
    "qwen2_moe": {**_GGUF_LAYER_NAMES, **_MOE_NAMES, "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
                  "ffn_gate_shexp": "mlp.shared_expert.gate_proj", "ffn_up_shexp": "mlp.shared_expert.up_proj",
                  "ffn_down_shexp": "mlp.shared_expert.down_proj"},
    # Phi-3 / Phi-4-mini: llama.cpp keeps HF's fused projections (qkv_proj, gate_up_proj: gate rows first), the
    # layouts our fused parameters already have; its loader also takes q/k/v as three tensors
    "phi3": {**_GGUF_LAYER_NAMES, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
}


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    base, _, suffix = gguf_name.rpartition(".")           # suffix: weight | bias
    parts = base.split(".")
    layer_names = _GGUF_ARCH_LAYER_NAMES.get(arch, _GGUF_LAYER_NAMES)
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in layer_names:
        return f"model.layers.{parts[1]}.{layer_names[parts[2]]}.{suffix}"
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _PER_EXPERT_NAMES and parts[3].isdigit() and \
            "ffn_gate_inp" in layer_names:
        return f"model.layers.{parts[1]}.mlp.experts.{parts[3]}.{_PER_EXPERT_NAMES[parts[2]]}.{suffix}"
    if base in _GGUF_GLOBAL_NAMES:
        return f"{_GGUF_GLOBAL_NAMES[base]}.{suffix}"
    if base in ("rope_freqs", "rope_factors_long", "rope_factors_short"):     # folded into ArchConfig.rope_scaling
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


def gguf_state_dict(reader, cfg: ArchConfig, dtype: torch.dtype, skip=frozenset()) -> dict[str, torch.Tensor]:
    """HF name -> float tensor of `dtype` (dequantized), for every tensor not named in `skip`."""
    state = {}
    for t in progress(reader.tensors, "loading weights", unit="tensor"):
        name = hf_name(t.name, cfg.architecture)
        if name is None or name in skip:
            continue
        w = gguf_slice(t, shard_spec(name, cfg))
        if cfg.architecture == "gemma3" and name.endswith("norm.weight"):
            w = w - 1      # llama.cpp stores Gemma's norm multiplier 1 + w; HF names mean w
        if permuted_qk(name, cfg):
            w = unpermute(w, w.shape[0] // cfg.head_dim)     # per head, so a slice of whole heads works too
        state[name] = w.to(dtype)
    return state
