"""Logit penalties, batched: repetition (vLLM/HF semantics) and presence/frequency (OpenAI semantics).

Token history arrives as right-padded [B, L] id tensors (pad id = vocab_size). Scattering into a [B, V + 1]
buffer and dropping the last column turns them into per-token counts without any Python loop, so the cost is
O(B * (L + V)) on the device regardless of how ragged the batch is.
"""
from __future__ import annotations

import torch


def token_bin_counts(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Count occurrences of each vocabulary id per row; ids == vocab_size are padding and ignored. -> [B, V]."""
    b = token_ids.shape[0]
    counts = torch.zeros(b, vocab_size + 1, dtype=torch.int32, device=token_ids.device)
    counts.scatter_add_(1, token_ids, torch.ones_like(token_ids, dtype=torch.int32))
    return counts[:, :vocab_size]


def apply_penalties(
    logits: torch.Tensor,
    prompt_token_ids: torch.Tensor | None,
    output_token_ids: torch.Tensor,
    repetition_penalty: torch.Tensor,
    presence_penalty: torch.Tensor,
    frequency_penalty: torch.Tensor,
) -> torch.Tensor:
    """Return penalised logits [B, V] (a new tensor; the input is left as is).

    Repetition (like HF's RepetitionPenaltyLogitsProcessor and vLLM): every token seen in prompt or output has a
    positive logit divided by the penalty and a non-positive one multiplied by it. Presence/frequency (OpenAI):
    subtract `presence * [count > 0] + frequency * count`, counting generated tokens only.
    Rows with neutral values (1.0 / 0.0 / 0.0) come out unchanged.
    """
    vocab_size = logits.shape[1]
    output_counts = token_bin_counts(output_token_ids, vocab_size)
    output_mask = output_counts > 0
    if prompt_token_ids is not None:  # None = no row has a repetition penalty (see SamplingMetadata.build)
        seen = token_bin_counts(prompt_token_ids, vocab_size) > 0
        seen |= output_mask
        rep = repetition_penalty.unsqueeze(1).to(logits.dtype)
        penalised = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalised, logits)
    else:
        logits = logits.clone()

    logits -= frequency_penalty.unsqueeze(1).to(logits.dtype) * output_counts.to(logits.dtype)
    logits -= presence_penalty.unsqueeze(1).to(logits.dtype) * output_mask.to(logits.dtype)
    return logits


def apply_blocked_tokens(logits: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Forbid (row, token) pairs in place, e.g. EOS/stop ids of requests still below min_tokens."""
    logits[rows, cols] = float("-inf")
    return logits
