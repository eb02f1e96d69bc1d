"""What architectures beyond the Llama family add to ArchConfig, read from a Hugging Face config.json or from a
GGUF's metadata (llama.cpp's key names).

`hf_arch_extras(arch, config_json)` returns ArchConfig field overrides; the loader applies them on top of the
fields every decoder has. Adding an architecture means adding its branch here and its model file.
"""
from __future__ import annotations

import math


def _rope_dict(rope: dict | None) -> tuple[float | None, dict | None]:
    """One HF rope dict -> (theta, scaling dict or None for plain RoPE)."""
    rope = dict(rope or {})
    theta = rope.pop("rope_theta", None)
    rope.pop("partial_rotary_factor", None)
    if "type" in rope:
        rope.setdefault("rope_type", rope.pop("type"))
    if rope.get("rope_type") == "su":                     # the old name of longrope (Phi-3)
        rope["rope_type"] = "longrope"
    return theta, (rope if rope.get("rope_type", "default") != "default" else None)


def _moe(cfg: dict, num_experts_key: str, intermediate_key: str) -> dict:
    # transformers 5 writes num_local_experts for every MoE model; older Qwen3-MoE files say num_experts
    num_experts = cfg.get(num_experts_key, cfg.get("num_local_experts"))
    return dict(num_experts=int(num_experts), num_experts_per_tok=int(cfg["num_experts_per_tok"]),
                moe_intermediate_size=int(cfg[intermediate_key]))


def hf_arch_extras(arch: str, cfg: dict) -> dict:
    extras: dict = {}
    if arch in ("qwen3", "qwen3_moe"):
        extras["qk_norm"] = True
        extras["attention_bias"] = bool(cfg.get("attention_bias", False))
    if arch in ("qwen2_moe", "qwen3_moe"):
        extras.update(_moe(cfg, "num_experts", "moe_intermediate_size"))
        extras["norm_topk_prob"] = bool(cfg.get("norm_topk_prob", False))   # transformers' default
        step, n = int(cfg.get("decoder_sparse_step", 1) or 1), cfg["num_hidden_layers"]
        only = set(cfg.get("mlp_only_layers") or [])
        # transformers: layer i is sparse iff i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0
        extras["dense_layers"] = tuple(i for i in range(n) if i in only or (i + 1) % step != 0)
    if arch == "qwen2_moe":
        extras["shared_expert_intermediate_size"] = int(cfg["shared_expert_intermediate_size"])
    if arch == "mixtral":
        extras.update(_moe(cfg, "num_local_experts", "intermediate_size"))
        extras["norm_topk_prob"] = True
    if arch == "gemma3":
        extras.update(_gemma3(cfg))
    if arch == "phi3":
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        extras["partial_rotary_factor"] = float(rope.get("partial_rotary_factor",
                                                         cfg.get("partial_rotary_factor", 1.0)))
        _, scaling = _rope_dict(rope)
        if scaling is not None and scaling["rope_type"] == "longrope":
            scaling.setdefault("original_max_position_embeddings",
                               cfg.get("original_max_position_embeddings", cfg.get("max_position_embeddings")))
        extras["rope_scaling"] = scaling
        extras["hidden_act"] = cfg.get("hidden_act", "silu")
    return extras


def _gemma3(cfg: dict) -> dict:
    n = cfg["num_hidden_layers"]
    pattern = int(cfg.get("sliding_window_pattern", 6))
    layer_types = cfg.get("layer_types") or [
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    rope = cfg.get("rope_parameters") or {}
    if "full_attention" in rope:                            # transformers >= 5: one rope dict per layer type
        theta, scaling = _rope_dict(rope["full_attention"])
        local_theta, _ = _rope_dict(rope.get("sliding_attention"))
    else:                                                   # 4.x: rope_theta, rope_scaling, rope_local_base_freq
        theta, scaling = cfg.get("rope_theta"), _rope_dict(cfg.get("rope_scaling"))[1]
        local_theta = cfg.get("rope_local_base_freq")
    if cfg.get("attn_logit_softcapping") is not None:
        raise NotImplementedError("gemma3: attn_logit_softcapping is not supported")
    if cfg.get("use_bidirectional_attention"):
        raise NotImplementedError("gemma3: use_bidirectional_attention (an encoder variant) is not supported")
    return dict(
        qk_norm=True, layer_types=tuple(layer_types),
        rope_theta=float(theta if theta is not None else 1_000_000.0), rope_scaling=scaling,
        rope_local_theta=float(local_theta if local_theta is not None else 10_000.0),
        query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar", 256)),
        hidden_act=cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh",
        final_logit_softcapping=cfg.get("final_logit_softcapping"),
        attention_bias=bool(cfg.get("attention_bias", False)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
    )


# ---- GGUF metadata (llama.cpp's names) -----------------------------------------------------------------------
def _gguf_token_id(reader, token: str, guess: int) -> int | None:
    """The id of `token` when the vocabulary has it at `guess` (reading one entry, not the 262k list)."""
    field = reader.fields.get("tokenizer.ggml.tokens")
    if field is None or guess >= len(field.data):
        return None
    return guess if bytes(field.parts[field.data[guess]]).decode(errors="replace") == token else None


def gguf_arch_extras(arch: str, meta: dict, reader) -> dict:
    def get(key, default=None):                      # llama.cpp's own architecture name prefixes the keys
        return meta.get(f"{meta['general.architecture']}.{key}", default)
    extras: dict = {}
    if arch in ("qwen3", "qwen3_moe"):
        extras["qk_norm"] = True
    if arch in ("qwen2_moe", "qwen3_moe"):
        # llama.cpp renormalises the top-k weights of qwen3moe (as Qwen3-MoE's configs say), never those of qwen2moe
        # (Qwen1.5-MoE's and Qwen2-57B-A14B's configs say false); a layer without a router (ffn_gate_inp) is a dense
        # one (mlp_only_layers)
        names = {t.name for t in reader.tensors}
        extras.update(num_experts=int(get("expert_count")), num_experts_per_tok=int(get("expert_used_count")),
                      moe_intermediate_size=int(get("expert_feed_forward_length")),
                      norm_topk_prob=arch == "qwen3_moe" and bool(get("expert_weights_norm", True)),
                      dense_layers=tuple(i for i in range(int(get("block_count")))
                                         if f"blk.{i}.ffn_gate_inp.weight" not in names))
    if arch == "qwen2_moe":
        extras["shared_expert_intermediate_size"] = int(get("expert_shared_feed_forward_length"))
    if arch == "mixtral":
        # llama.cpp's "llama" files with experts: feed_forward_length is each expert's, and the top-k weights are
        # always renormalised (as transformers' Mixtral does)
        extras.update(num_experts=int(get("expert_count")), num_experts_per_tok=int(get("expert_used_count")),
                      moe_intermediate_size=int(get("expert_feed_forward_length", get("feed_forward_length"))),
                      norm_topk_prob=True)
    if arch == "gemma3":
        n, hidden = int(get("block_count")), int(get("embedding_length"))
        head_dim, num_heads = int(get("attention.key_length")), int(get("attention.head_count"))
        # llama.cpp fixes what GGUF does not carry: every 6th layer global, local RoPE base 10000, and the query
        # scale 1/sqrt(head_dim) except for the 27B model (62 layers), which uses hidden / heads
        extras.update(
            qk_norm=True, sliding_window=int(get("attention.sliding_window", 4096)),
            layer_types=tuple("sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n)),
            rope_local_theta=10000.0, hidden_act="gelu_pytorch_tanh",
            query_pre_attn_scalar=float(hidden // num_heads if n == 62 else head_dim),
            final_logit_softcapping=get("final_logit_softcapping"))
        # <end_of_turn> ends a chat turn (Gemma's generation_config lists it with <eos>)
        end_of_turn = _gguf_token_id(reader, "<end_of_turn>", 106)
        eos = tuple(int(i) for i in [meta.get("tokenizer.ggml.eos_token_id"), end_of_turn] if i is not None)
        extras["eos_token_ids"] = tuple(dict.fromkeys(eos))
    if arch == "phi3":
        extras.update(_gguf_phi3(get, reader))
    return extras


def _gguf_phi3(get, reader) -> dict:
    """Phi-3 / Phi-4-mini as llama.cpp's converter writes them: RoPE on `rope.dimension_count` of each head's
    dimensions (Phi-4-mini: 96 of 128), LongRoPE's factor lists as the F32 tensors rope_factors_short / _long with
    the original context in `rope.scaling.original_context_length`, and HF's sliding window (0 = none)."""
    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden // heads))
    extras: dict = dict(partial_rotary_factor=int(get("rope.dimension_count", head_dim)) / head_dim, hidden_act="silu")
    # NOTE: llama.cpp turns Phi-3's sliding window off (its kernels lacked it); transformers, the reference the
    # same model's safetensors are held to here, applies it, so a GGUF and its checkpoint serve alike
    if int(get("attention.sliding_window", 0) or 0) > 0:
        extras["sliding_window"] = int(get("attention.sliding_window"))
    factors = {t.name: t for t in reader.tensors if t.name in ("rope_factors_short.weight", "rope_factors_long.weight")}
    if len(factors) == 2:
        orig, context = int(get("rope.scaling.original_context_length")), int(get("context_length"))
        scaling = {"rope_type": "longrope", "original_max_position_embeddings": orig,
                   "short_factor": [float(x) for x in factors["rope_factors_short.weight"].data],
                   "long_factor": [float(x) for x in factors["rope_factors_long.weight"].data]}
        # the converter writes HF's default attention factor rounded to float32: keep HF's own unless it differs
        stored = get("rope.scaling.attn_factor")
        default = math.sqrt(1 + math.log(context / orig) / math.log(orig)) if context > orig else 1.0
        if stored is not None and abs(float(stored) - default) > 1e-6 * default:
            scaling["attention_factor"] = float(stored)
        extras["rope_scaling"] = scaling
    return extras
