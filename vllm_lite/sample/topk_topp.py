"""Filtering (min-p, top-k, top-p) and random sampling: the swappable hot spots of the sampler.

The filters live with their Triton kernel in vllm_lite.kernels.sampling (plain-PyTorch references `*_torch` and the
dispatching `apply_min_p` / `apply_top_k_top_p`, re-exported here) with stable signatures:
  * `apply_top_k_top_p(logits, k, p, max_k=None, use_kernel=False)` -> logits with filtered-out entries set to -inf,
  * `apply_min_p(logits, min_p, use_kernel=False)`                  -> same contract,
and this module adds `random_sample(probs, generators)` -> sampled ids [B].
Semantics follow vLLM: top-k keeps every token whose logit ties the k-th largest; top-p keeps the smallest
descending-probability prefix whose mass reaches p (always at least the best token); min-p keeps tokens whose
probability is at least min_p times the row's highest probability.
With use_kernel=True (the Sampler passes KernelConfig.sampling_kernel), CUDA logits go through the sort-free Triton
kernel (same allowed set; off by default because it measured slower than the torch path on the H100, docs/PERF.md).
"""
from __future__ import annotations

import torch

from vllm_lite.kernels.argmax import row_argmax
from vllm_lite.kernels.sampling import apply_min_p, apply_min_p_torch, apply_top_k_top_p, apply_top_k_top_p_torch

__all__ = ["apply_min_p", "apply_min_p_torch", "apply_top_k_top_p", "apply_top_k_top_p_torch", "random_sample",
           "skip_random_draws"]


def random_sample(probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """Sample one id per row from probs [B, V] with the exponential-race trick: argmax(probs / q), q ~ Exp(1).

    This equals categorical sampling but needs no cumsum/search and is a single fused pass on the GPU.
    Unseeded rows share one batched draw from the global generator; each seeded row draws its own q row with its
    generator, so its stream advances exactly V values per step whatever else is in the batch (reproducible alone
    or in any mixed batch). The per-row loop runs only over seeded rows. `probs` is overwritten.
    """
    q = torch.empty_like(probs)
    if len(generators) < probs.shape[0]:
        q.exponential_()
    for i, g in generators.items():
        q[i].exponential_(generator=g)
    return row_argmax(probs.div_(q)).view(-1)


def skip_random_draws(generator: torch.Generator, num_steps: int, vocab_size: int, device: torch.device) -> None:
    """Advance a seeded row's generator past `num_steps` draws of `random_sample` (a request resumed after
    preemption then continues with the same random stream as if it had never been preempted)."""
    q = torch.empty(vocab_size, dtype=torch.float32, device=device)
    for _ in range(num_steps):
        q.exponential_(generator=generator)
