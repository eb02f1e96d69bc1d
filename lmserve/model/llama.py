"""Llama-family decoder (Llama 2/3.x, Qwen2, Mistral): one class, differences come from ArchConfig. The shared
base of the other decoders too: each subclass swaps a part (`Attention.norm_qk`, `DecoderLayer.make_mlp`,
`LlamaForCausalLM.layer_cls`, `map_weight`) and keeps the rest.

Parameters use Hugging Face names, except that q/k/v and gate/up are fused into one matmul each;
`load_weights` maps HF names onto the fused tensors (also used by live weight updates).
"""
from __future__ import annotations

import torch
from torch import nn

from lmserve import ops
from lmserve.model.attention import AttentionMetadata, paged_attention
from lmserve.model.layers import GatedMLP, Linear, RMSNorm, RotaryEmbedding, RowParallelLinear
from lmserve.model.moe import map_expert_weight
from lmserve.model.parallel import (VocabParallelEmbedding, gather_vocab, local_intermediate, num_local_heads,
                                    num_local_kv_heads, shard_tensor)

KVCache = tuple[torch.Tensor, torch.Tensor]


class Attention(nn.Module):
    def __init__(self, cfg, layer_idx: int = 0):
        super().__init__()
        # this tensor-parallel rank's heads (all of them when tp_size is 1)
        self.num_heads = num_local_heads(cfg)
        self.num_kv_heads = num_local_kv_heads(cfg)
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = (cfg.query_pre_attn_scalar or self.head_dim) ** -0.5
        self.is_full_attention = cfg.layer_window(layer_idx) is None
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = RowParallelLinear(self.q_size, cfg.hidden_size, bias=False, tp_size=cfg.tp_size)

    def norm_qk(self, qkv: torch.Tensor) -> None:
        """Hook before RoPE (in place on the fused [num_tokens, q + k + v] projection); none here."""

    def forward(self, positions, x, meta: AttentionMetadata, kv_cache: KVCache):
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)
        self.norm_qk(qkv)
        # RoPE on q and k, k and v into the cache: one fused pass
        q = ops.rope_write_kv(qkv, meta.rope_cos, meta.rope_sin, kv_cache[0], kv_cache[1], meta.slot_mapping,
                              self.num_heads, self.num_kv_heads, self.head_dim)
        # [num_tokens, heads, head_dim]
        o = paged_attention(q, kv_cache[0], kv_cache[1], meta, self.scale, full_attention=self.is_full_attention)
        return self.o_proj(o.reshape(num_tokens, self.q_size))


class DecoderLayer(nn.Module):
    attn_cls = Attention

    def __init__(self, cfg, layer_idx: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = self.attn_cls(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = self.make_mlp(cfg, layer_idx)

    def make_mlp(self, cfg, layer_idx: int) -> nn.Module:
        return GatedMLP(cfg.hidden_size, local_intermediate(cfg), cfg.hidden_act, cfg.tp_size)

    def forward(self, positions, x, residual, meta, kv_cache):
        """-> (this layer's MLP output, residual stream before it); the next layer's norm adds the two."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, meta, kv_cache)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg, layer_cls: type[nn.Module] = DecoderLayer):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg)
        rotary_dim = int(cfg.head_dim * cfg.partial_rotary_factor)
        self.rotary = RotaryEmbedding(rotary_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.layers = nn.ModuleList(layer_cls(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    layer_cls = DecoderLayer
    # MoE decoders: the checkpoint's expert projection names -> gate / up / down (moe.map_expert_weight)
    expert_names: dict[str, str] | None = None

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.model = LlamaModel(cfg, self.layer_cls)
        # NOTE: split over the vocabulary like the embedding (the same rows, and the same LinearMethod, when tied)
        self.lm_head = None if cfg.tie_word_embeddings else \
            Linear(cfg.hidden_size, self.model.embed_tokens.weight.shape[0], bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[KVCache]) -> torch.Tensor:
        """input_ids, positions: [num_tokens] -> final normed hidden states [num_tokens, hidden]."""
        x = self.embed(input_ids)
        return self.run_layers(x, positions, meta, kv_caches)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids -> the first layer's input [num_tokens, hidden]."""
        return self.model.embed_tokens(input_ids)

    def rope_tables(self, positions: torch.Tensor, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(cos, sin) at these positions for each RoPE the layers use; `layer_rope(layer)` indexes it."""
        return [self.model.rotary.lookup(positions, dtype)]

    def layer_rope(self, layer: nn.Module) -> int:
        return 0

    def run_layers(self, x, positions, meta: AttentionMetadata, kv_caches: list[KVCache]) -> torch.Tensor:
        """The decoder layers and the final norm on embedded tokens (model/fused_decode.py does the same in one
        kernel call for decode steps)."""
        ropes = self.rope_tables(positions, x.dtype)
        residual = None
        for layer, kv_cache in zip(self.model.layers, kv_caches):
            meta.rope_cos, meta.rope_sin = ropes[self.layer_rope(layer)]
            x, residual = layer(positions, x, residual, meta, kv_cache)
        return self.model.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:   # [n, hidden] -> [n, vocab] fp32
        return gather_vocab(self._local_logits(hidden), self.cfg)

    def _local_logits(self, hidden: torch.Tensor) -> torch.Tensor:   # [n, hidden] -> [n, vocab / tp] fp32
        return self.output_head().linear_method(hidden).float()

    def output_head(self) -> nn.Module:
        """The module whose weight (and LinearMethod) projects to the vocabulary: lm_head, or the tied embedding."""
        return self.model.embed_tokens if self.lm_head is None else self.lm_head

    # ---- weights -------------------------------------------------------------------------------------
    def fused_slices(self) -> dict[str, tuple[str, int, int]]:
        """HF projection name -> (our fused parameter's module name, first row, rows): this rank's rows."""
        cfg = self.cfg
        q, kv = num_local_heads(cfg) * cfg.head_dim, num_local_kv_heads(cfg) * cfg.head_dim
        inter = local_intermediate(cfg)
        return {"q_proj": ("qkv_proj", 0, q), "k_proj": ("qkv_proj", q, kv), "v_proj": ("qkv_proj", q + kv, kv),
                "gate_proj": ("gate_up_proj", 0, inter), "up_proj": ("gate_up_proj", inter, inter)}

    def fused_slice(self, name: str, rows) -> tuple[str, int, int] | None:
        """An HF weight name -> (our fused module's name, first row, rows) of this rank, or None where it is not
        part of a fused module. A gate/up pair halves its own module's rows, `rows(module name)` (None: not known),
        so an MLP of another size than the dense one (a shared expert) maps too."""
        parts = name.split(".")
        fused = self.fused_slices()
        if len(parts) < 2 or parts[-2] not in fused:
            return None
        fused_name, start, size = fused[parts[-2]]
        module = ".".join(parts[:-2] + [fused_name])
        if fused_name == "gate_up_proj" and (n := rows(module)) is not None:
            size = n // 2
            start = 0 if parts[-2] == "gate_proj" else size
        return module, start, size

    def map_weight(self, name: str, tensor: torch.Tensor, params: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
        """An HF-named tensor -> (the view of our parameter it fills, the value), or None to skip it."""
        if "rotary_emb" in name or (name == "lm_head.weight" and self.lm_head is None):
            return None   # computed, or tied to the embedding
        if self.expert_names and (dst := map_expert_weight(name, params, self.expert_names)) is not None:
            return dst, tensor
        tensor = shard_tensor(name, tensor, self.cfg)     # this tensor-parallel rank's slice (no-op at tp 1)
        target, start, size = name, None, None
        sliced = self.fused_slice(name, lambda m: params[f"{m}.weight"].shape[0] if f"{m}.weight" in params else None)
        if sliced is not None:
            module, start, size = sliced
            target = f"{module}.{name.rsplit('.', 1)[1]}"
        if target not in params:
            raise KeyError(f"unexpected weight {name!r}")
        return (params[target] if start is None else params[target].narrow(0, start, size)), tensor

    def load_weights(self, weights: dict[str, torch.Tensor]) -> list[str]:
        """Copy HF-named tensors into the (fused) parameters. Returns the names loaded.

        All names and shapes are checked before anything is copied, so a bad update changes nothing."""
        params = dict(self.named_parameters())
        plan = []
        for name, tensor in weights.items():
            mapped = self.map_weight(name, tensor, params)
            if mapped is None:
                continue
            dst, value = mapped
            if dst.shape != value.shape:
                raise ValueError(f"weight {name!r}: shape {tuple(value.shape)} != expected {tuple(dst.shape)}")
            plan.append((name, dst, value))
        with torch.no_grad():
            for _, dst, value in plan:
                dst.copy_(value)
        return [name for name, _, _ in plan]
