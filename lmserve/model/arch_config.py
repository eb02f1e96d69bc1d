"""ArchConfig: the architecture hyper-parameters every model file and the runner read, whatever the file format."""
from __future__ import annotations

from dataclasses import dataclass

SUPPORTED_ARCHS = ("llama", "qwen2", "mistral", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral", "gemma3", "phi3")


@dataclass(frozen=True)
class ArchConfig:
    architecture: str              # one of SUPPORTED_ARCHS (the registry key)
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
    dense_layers: tuple[int, ...] = ()      # MoE models: layers with a plain MLP instead (qwen2_moe, qwen3_moe)
    shared_expert_intermediate_size: int = 0    # qwen2_moe: the always-on expert beside the routed ones (0 = none)
    partial_rotary_factor: float = 1.0      # fraction of head_dim that RoPE rotates (phi3 / phi-4-mini)
    # vision-language models (model/vlm_config.py): the checkpoint's config.json less its text_config; None = text
    vision: dict | None = None

    # tensor parallelism: this process's shard (model/parallel.py); the fields above always describe the full model
    tp_rank: int = 0
    tp_size: int = 1

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of one layer (None = full attention)."""
        if self.sliding_window is None or (self.layer_types and self.layer_types[layer] != "sliding_attention"):
            return None
        return self.sliding_window
