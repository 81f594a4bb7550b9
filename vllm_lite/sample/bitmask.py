"""Packed grammar bitmasks (xgrammar's layout: int32 words, bit t of a row allows token t) as boolean masks."""
from __future__ import annotations

import torch


def unpack_bitmask(words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """words [N, W] int32 -> allowed [N, vocab_size] bool; tokens past W * 32 (a model vocabulary padded beyond the
    tokenizer's) are not allowed."""
    n, w = words.shape
    bits = torch.arange(32, dtype=torch.int32, device=words.device)
    allowed = ((words.unsqueeze(-1) >> bits) & 1).bool().view(n, w * 32)
    if w * 32 >= vocab_size:
        return allowed[:, :vocab_size]
    return torch.cat([allowed, allowed.new_zeros(n, vocab_size - w * 32)], dim=1)


def pack_bitmask(allowed: torch.Tensor) -> torch.Tensor:
    """allowed [N, V] bool -> words [N, ceil(V / 32)] int32 (the inverse of unpack_bitmask; tests and tools)."""
    n, v = allowed.shape
    w = -(-v // 32)
    padded = torch.zeros(n, w * 32, dtype=torch.int64, device=allowed.device)
    padded[:, :v] = allowed.to(torch.int64)
    words = (padded.view(n, w, 32) << torch.arange(32, device=allowed.device)).sum(dim=-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
