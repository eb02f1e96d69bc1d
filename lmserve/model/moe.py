"""Sparse mixture-of-experts MLP (Mixtral, Qwen3-MoE): a top-k router and experts run grouped by expert.

Parameters follow transformers 5's fused layout: `gate.weight` [num_experts, hidden] (the router),
`experts.gate_up_proj` [num_experts, 2 * intermediate, hidden], `experts.down_proj` [num_experts, hidden,
intermediate]. Checkpoints with one tensor per expert are mapped onto them by `expert_weight_slice`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.model.layers import Linear, deferring, gated_activation


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, act: str = "silu"):
        super().__init__()
        self.intermediate_size = intermediate_size
        self.act = gated_activation(act)      # act(gate) * up
        device = "meta" if deferring() else None      # the loader may give the experts GGUF blocks instead
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size, device=device))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, device=device))
        # per expert (gate_up, down) LinearMethods over a GGUF file's blocks (engine/weights.py attach_gguf), the
        # parameters above then meta tensors; None: the float parameters
        self.methods: list | None = None

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x: [num_tokens, hidden]; expert_ids, weights: [num_tokens, top_k] -> [num_tokens, hidden].

        The (token, expert) pairs are sorted by expert so each expert runs one matmul over a contiguous slice of
        its tokens; the loop is over experts that got tokens, never over tokens.
        """
        top_k = expert_ids.shape[1]
        flat = expert_ids.reshape(-1)                                     # [num_tokens * top_k]
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.gate_up_proj.shape[0]).tolist()
        token_of = order // top_k                                          # source row of each sorted pair
        xs = x[token_of]                                                   # [num_pairs, hidden], grouped by expert
        ys = torch.empty_like(xs)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            end = start + count
            if self.methods is not None:
                gate_up, down = self.methods[expert]
                ys[start:end] = down(self.act(gate_up(xs[start:end])))
            else:
                ys[start:end] = F.linear(self.act(F.linear(xs[start:end], self.gate_up_proj[expert])),
                                         self.down_proj[expert])
            start = end
        ys.mul_(weights.reshape(-1)[order].unsqueeze(1).to(ys.dtype))
        return torch.zeros_like(x).index_add_(0, token_of, ys)


class SparseMoeBlock(nn.Module):
    """Router (softmax over experts, top-k, optionally renormalised) + grouped experts."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 norm_topk_prob: bool, act: str = "silu"):
        super().__init__()
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob
        self.gate = Linear(hidden_size, num_experts, bias=False)
        # the router stays a plain float32 F.linear: a small matrix whose logits pick the experts, and the fused
        # decode (csrc/cpu/moe.cpp) multiplies it the same way for the same bits
        self.gate.packable = False
        self.experts = Experts(num_experts, hidden_size, intermediate_size, act)
        # the whole block in one kernel call, bit-identical to route + experts (ops.make_moe_mlp; set by the model
        # runner through model/fused_decode.py where the experts are on GGUF blocks); None: the modules run
        self.kernel = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [num_tokens, hidden] -> (expert ids, weights), each [num_tokens, top_k]."""
        probs = torch.softmax(self.gate(x).float(), dim=-1)              # [num_tokens, num_experts] fp32
        weights, expert_ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return expert_ids, weights.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None and self.gate.lora is None:    # an adapter on the router: the modules apply it
            return self.kernel(x)
        return self.modules_forward(x)

    def modules_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block as its modules compute it: the reference the kernel equals bit for bit."""
        return self.experts(x, *self.route(x))


def map_expert_weight(name: str, params: dict, names: dict[str, str]) -> torch.Tensor | None:
    """A per-expert checkpoint tensor ('...experts.3.w1.weight'), or one of all experts stacked ('...experts.w1.weight',
    [experts, rows, cols]) -> the view of the fused parameter it fills, or None when `name` is neither. `names` maps
    the checkpoint's projection names to gate / up / down."""
    parts = name.split(".")
    if len(parts) >= 3 and parts[-3] == "experts" and parts[-2] in names:     # all experts stacked (GGUF files)
        prefix, expert, kind = ".".join(parts[:-2]), None, names[parts[-2]]
    elif len(parts) >= 4 and parts[-4] == "experts" and parts[-3].isdigit() and parts[-2] in names:
        prefix, expert, kind = ".".join(parts[:-4] + ["experts"]), int(parts[-3]), names[parts[-2]]
    else:
        return None
    if f"{prefix}.down_proj" not in params:
        raise KeyError(f"unexpected weight {name!r}")
    fused = params[f"{prefix}.down_proj" if kind == "down" else f"{prefix}.gate_up_proj"]
    fused = fused if expert is None else fused[expert]
    if kind == "down":
        return fused
    half = fused.shape[-2] // 2                   # gate rows, then up rows: [..., 2 * intermediate, hidden]
    return fused.narrow(-2, half if kind == "up" else 0, half)


def moe_block(cfg) -> SparseMoeBlock:
    return SparseMoeBlock(cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_tok,
                          cfg.norm_topk_prob, cfg.hidden_act)
