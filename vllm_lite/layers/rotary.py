"""Rotary position embeddings (neox / HF rotate_half style) from a precomputed cos/sin cache.

The inverse frequencies follow transformers' ROPE_INIT_FUNCTIONS formula for formula (default, linear, dynamic,
llama3, yarn) so that our logits match HF's. The cache is indexed by `positions`, so any mix of requests at any
offsets is one gather: no per-request Python, nothing data-dependent for torch.compile.

Cache length (`max_rope_positions`) follows vLLM: max_position_embeddings, extended by the factor for `linear`
and to original_max_position_embeddings * factor for `yarn`. `dynamic` is HF's dynamic NTK evaluated at
max_position_embeddings, which equals the default frequencies for every position the cache holds (HF only rescales
beyond that length, and max_model_len never exceeds it).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


def rope_parameters(cfg: Any) -> dict[str, Any]:
    """The rope settings as one flat dict, from transformers 5's `rope_parameters` or older `rope_theta`+`rope_scaling`."""
    params: dict[str, Any] = dict(getattr(cfg, "rope_parameters", None) or {})
    for key, value in (getattr(cfg, "rope_scaling", None) or {}).items():
        params.setdefault(key, value)
    params.setdefault("rope_theta", getattr(cfg, "rope_theta", None) or 10000.0)
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    if params["rope_type"] in ("llama3", "yarn") and not params.get("original_max_position_embeddings"):
        params["original_max_position_embeddings"] = (getattr(cfg, "original_max_position_embeddings", None)
                                                      or cfg.max_position_embeddings)
    return params


def head_dim_of(cfg: Any) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _default_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float32) / dim))


def compute_inv_freq(cfg: Any) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim/2] float32, attention scaling applied to cos/sin), as transformers computes them."""
    p = rope_parameters(cfg)
    rope_type = p["rope_type"]
    base = float(p["rope_theta"])
    dim = int(head_dim_of(cfg) * p.get("partial_rotary_factor", 1.0))
    if rope_type == "default":
        return _default_inv_freq(base, dim), 1.0
    if rope_type == "linear":
        return _default_inv_freq(base, dim) / p["factor"], 1.0
    if rope_type == "dynamic":
        factor, seq_len = p["factor"], cfg.max_position_embeddings
        base = base * ((factor * seq_len / cfg.max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
        return _default_inv_freq(base, dim), 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(p, base, dim), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(cfg, p, base, dim)
    raise ValueError(f"rope_type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")


def _llama3_inv_freq(p: dict[str, Any], base: float, dim: int) -> torch.Tensor:
    inv_freq = _default_inv_freq(base, dim)
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(cfg: Any, p: dict[str, Any], base: float, dim: int) -> tuple[torch.Tensor, float]:
    orig_len = p["original_max_position_embeddings"]
    factor = p.get("factor") or cfg.max_position_embeddings / orig_len
    attention_factor = p.get("attention_factor")
    mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast = p.get("beta_fast") or 32
    beta_slow = p.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(orig_len / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float32) / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def max_rope_positions(cfg: Any) -> int:
    """Longest context the rotary cache serves (vLLM's derived max length for scaled rope types)."""
    p = rope_parameters(cfg)
    n = int(cfg.max_position_embeddings)
    if p["rope_type"] == "linear":
        n = int(n * p["factor"])
    elif p["rope_type"] == "yarn" and p.get("factor"):
        n = max(n, int(p["original_max_position_embeddings"] * p["factor"]))
    return n


class RotaryEmbedding(nn.Module):
    """cos/sin cache [max_positions, rot_dim] (cos half | sin half) for rotate-half rotary of q and k."""

    def __init__(self, head_dim: int, max_positions: int, inv_freq: torch.Tensor, attention_scaling: float = 1.0):
        super().__init__()
        self.head_dim = head_dim
        self.rot_dim = 2 * inv_freq.shape[0]
        t = torch.arange(max_positions, dtype=torch.float32, device=inv_freq.device)
        freqs = t[:, None] * inv_freq.to(torch.float32)[None, :]
        cache = torch.cat([freqs.cos() * attention_scaling, freqs.sin() * attention_scaling], dim=-1)
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather once per forward: ([T, rot_dim/2], [T, rot_dim/2]) in the activation dtype (as HF casts). The
        attention op applies them (kernels/qk_norm_rope.py: `apply_rotary`, or the fused kernel)."""
        cos, sin = self.cos_sin_cache.index_select(0, positions).to(dtype).chunk(2, dim=-1)
        return cos, sin

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, rot_dim={self.rot_dim}, max_positions={self.cos_sin_cache.shape[0]}"


def get_rope(cfg: Any, max_positions: int | None = None) -> RotaryEmbedding:
    """The rotary embedding an HF config describes, with its cache sized to `max_positions` (default: the config's)."""
    inv_freq, scaling = compute_inv_freq(cfg)
    return RotaryEmbedding(head_dim_of(cfg), max_positions or max_rope_positions(cfg), inv_freq, scaling)
