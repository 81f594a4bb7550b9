"""The attention layer the models use: reshapes heads and hands off to the context's backend."""
from __future__ import annotations

import torch
from torch import nn

from vllm_lite.attention.backend import AttentionContext, AttentionSpec


class Attention(nn.Module):
    def __init__(self, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 ctx: AttentionContext) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.spec = AttentionSpec(num_heads, num_kv_heads, head_dim, scale)
        self.ctx = ctx

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, Hq*D], k/v: [T, Hkv*D] (rotary already applied) -> [T, Hq*D]."""
        s = self.spec
        t = q.shape[0]
        out = self.ctx.backend.forward(q.view(t, s.num_heads, s.head_dim), k.view(t, s.num_kv_heads, s.head_dim),
                                       v.view(t, s.num_kv_heads, s.head_dim), self.ctx.kv_caches[self.layer_idx],
                                       s, self.ctx.metadata)
        return out.reshape(t, s.num_heads * s.head_dim)
