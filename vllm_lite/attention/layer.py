"""The attention layer the models use: calls the opaque `vllm_lite::attention` custom op.

The op (compile/custom_ops.py) looks the context up by id and runs its backend (q/k norm, rotary, KV-cache write,
attention), so the same code path serves eager mode, torch.compile (Dynamo sees one opaque op per layer) and
CUDA-graph capture.
"""
from __future__ import annotations

import torch
from torch import nn

from vllm_lite.attention.backend import AttentionContext, AttentionSpec
from vllm_lite.compile.custom_ops import register_layer


class Attention(nn.Module):
    def __init__(self, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 ctx: AttentionContext) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.spec = AttentionSpec(num_heads, num_kv_heads, head_dim, scale)
        self.ctx = ctx
        self.ctx_id = register_layer(ctx, layer_idx, self.spec)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                q_weight: torch.Tensor | None = None, k_weight: torch.Tensor | None = None,
                eps: float = 0.0) -> torch.Tensor:
        """q: [T, Hq*D], k/v: [T, Hkv*D] from the qkv projection (views are fine); cos/sin: [T, rot/2];
        q_weight/k_weight: per-head RMSNorm weights (Qwen3) or None -> [T, Hq*D]."""
        return torch.ops.vllm_lite.attention(q, k, v, cos, sin, q_weight, k_weight, eps, self.ctx_id,
                                             self.layer_idx)
