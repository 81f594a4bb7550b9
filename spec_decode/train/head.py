"""The trainable EAGLE-3 head: the same arithmetic as spec_decode/eagle.py's `Eagle3Head` (which runs it over the
engine's paged KV cache), written over dense [batch, time] tensors with training-time test (TTT).

Row p of a sequence t_0 .. t_{n-1} pairs the target's fused low/mid/high hidden state at position p with token
t_{p+1} and predicts the target's greedy token after t_{p+1}. Draft step j (0 .. steps-1) of row p stands for the
j-th draft of a request whose last committed token is t_{p+1}: it reads token t_{p+1+j} (the committed tokens stand
in for accepted drafts) and the head's own pre-norm output of step j - 1 at row p, sits at position p + j, and
attends to step 0's keys of rows 0 .. p plus its own row's keys of steps 1 .. j, exactly the KV cache the engine's
drafter holds at that point (catch-up rows, then one decode row per draft).

Parameter names are the public checkpoint's (fc, midlayer.*, norm, lm_head), so `state_dict()` is the export; the
token embedding is the target's, frozen and not saved (eagle.py then shares the target's).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vllm_lite.kernels.qk_norm_rope import apply_rotary
from vllm_lite.layers.norm import RMSNorm
from vllm_lite.layers.rotary import get_rope, head_dim_of


class _Attention(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        hidden = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = head_dim_of(cfg)
        self.q_proj = nn.Linear(2 * hidden, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(2 * hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(2 * hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """x [B, T, 2H]; cos/sin [T, 1, rot/2]; cache: the (k, v) of the earlier draft steps, this step's appended."""
        b, t, _ = x.shape
        q = apply_rotary(self.q_proj(x).view(b, t, self.num_heads, self.head_dim), cos, sin).transpose(1, 2)
        k = apply_rotary(self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim), cos, sin).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cache.append((k, v))
        out = ttt_attention(q, cache, self.head_dim ** -0.5)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


def ttt_attention(q: torch.Tensor, cache: list[tuple[torch.Tensor, torch.Tensor]], scale: float) -> torch.Tensor:
    """q [B, Hq, T, D]; cache[0]: step 0's (k, v) [B, Hkv, T, D], attended causally; cache[i > 0]: step i's, row p
    seeing only its own row. Softmax in float32 over all of them together."""
    rep = q.shape[1] // cache[0][0].shape[1]
    t = q.shape[2]
    k0, v0 = (x.repeat_interleave(rep, dim=1) for x in cache[0])
    scores = [torch.matmul(q, k0.transpose(-1, -2)) * scale]
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    scores[0] = scores[0].masked_fill(~causal, float("-inf"))
    diag_v = []
    for k, v in cache[1:]:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores.append((q * k).sum(-1, keepdim=True) * scale)
        diag_v.append(v)
    probs = torch.cat(scores, dim=-1).float().softmax(dim=-1).to(v0.dtype)
    out = torch.matmul(probs[..., :t], v0)
    for i, v in enumerate(diag_v):
        out = out + probs[..., t + i: t + i + 1] * v
    return out


class _MLP(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _MidLayer(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        hidden, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = _Attention(cfg)
        self.mlp = _MLP(cfg)
        self.input_layernorm = RMSNorm(hidden, eps)
        self.hidden_norm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """-> the pre-norm output (the next draft step's hidden state)."""
        normed = self.hidden_norm(hidden)
        x = self.self_attn(torch.cat([self.input_layernorm(embeds), normed], dim=-1), cos, sin, cache)
        x, residual = self.post_attention_layernorm(x, hidden)
        return self.mlp(x) + residual


class Eagle3TrainHead(nn.Module):
    """fc (3 target hidden states -> hidden), midlayer, norm, lm_head over the draft vocabulary."""

    def __init__(self, cfg: Any, draft_vocab_size: int, embed_weight: torch.Tensor) -> None:
        super().__init__()
        hidden = cfg.hidden_size
        if getattr(cfg, "hidden_act", "silu") not in ("silu", "swish"):
            raise ValueError(f"hidden_act={cfg.hidden_act!r} is not supported (EAGLE-3 heads use silu)")
        self.fc = nn.Linear(3 * hidden, hidden, bias=False)
        self.midlayer = _MidLayer(cfg)
        self.norm = RMSNorm(hidden, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(hidden, draft_vocab_size, bias=False)
        self.rotary = get_rope(cfg)
        self.register_buffer("embed_weight", embed_weight.detach().clone(), persistent=False)

    def forward(self, aux: torch.Tensor, tokens: torch.Tensor, steps: int) -> list[torch.Tensor]:
        """aux [B, T, 3H] (low | mid | high), tokens [B, T] -> the final-normed hidden states [B, T, H] of each
        step; `lm_head` turns the rows that matter into draft-vocabulary logits (the trainer scores only those)."""
        b, t = tokens.shape
        hidden = self.fc(aux)
        cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        normed = []
        for j in range(steps):
            ids = F.pad(tokens[:, 1 + j:], (0, min(1 + j, t)))
            positions = torch.arange(j, t + j, device=tokens.device)
            cos, sin = self.rotary.cos_sin(positions, hidden.dtype)
            embeds = F.embedding(ids, self.embed_weight).to(hidden.dtype)
            hidden = self.midlayer(embeds, hidden, cos[:, None], sin[:, None], cache)
            normed.append(self.norm(hidden))
        return normed
