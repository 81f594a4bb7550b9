"""The attention layer the models use: reshapes heads and calls the opaque `vllm_lite::attention` custom op.

The op (compile/custom_ops.py) looks the context up by id and runs its backend (KV-cache write + attention), so the
same code path serves eager mode, torch.compile (Dynamo sees one opaque op per layer) and CUDA-graph capture.
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

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, Hq*D], k/v: [T, Hkv*D] (rotary already applied) -> [T, Hq*D]."""
        s = self.spec
        t = q.shape[0]
        out = torch.ops.vllm_lite.attention(q.view(t, s.num_heads, s.head_dim), k.view(t, s.num_kv_heads, s.head_dim),
                                            v.view(t, s.num_kv_heads, s.head_dim), self.ctx_id, self.layer_idx)
        return out.view(t, s.num_heads * s.head_dim)
