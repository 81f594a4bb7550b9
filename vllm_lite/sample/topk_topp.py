"""Filtering (min-p, top-k, top-p) and random sampling: the swappable hot spots of the sampler.

These are plain-PyTorch reference implementations with stable signatures so that a fused GPU kernel
(Triton / FlashInfer top-k-top-p sampling) can replace them one-for-one:
  * `apply_top_k_top_p(logits, k, p)` -> logits with filtered-out entries set to -inf,
  * `apply_min_p(logits, min_p)`      -> same contract,
  * `random_sample(probs, generators)` -> sampled ids [B].
Semantics follow vLLM: top-k keeps every token whose logit ties the k-th largest; top-p keeps the smallest
descending-probability prefix whose mass reaches p (always at least the best token); min-p keeps tokens whose
probability is at least min_p times the row's highest probability.
With VLLM_LITE_SAMPLING_KERNEL=1, `apply_min_p` / `apply_top_k_top_p` on CUDA dispatch to the sort-free Triton
kernel in vllm_lite.kernels.sampling (same allowed set; off by default because it measured slower than this torch
path on the H100, docs/PERF.md); the `*_torch` functions are the references.
"""
from __future__ import annotations

import torch

_NEG_INF = float("-inf")
_kernels = None  # vllm_lite.kernels.sampling, imported on first CUDA call (it imports this module)


def _kernel_module(logits: torch.Tensor):
    global _kernels
    if not logits.is_cuda:
        return None
    if _kernels is None:
        from vllm_lite.kernels import sampling as _kernels_mod
        _kernels = _kernels_mod
    return _kernels if _kernels.kernel_enabled(logits) else None


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens with prob < min_p * max_prob (Triton kernel on CUDA, else `apply_min_p_torch`)."""
    kern = _kernel_module(logits)
    if kern is not None:
        return kern.top_k_top_p_min_p_triton(logits, None, None, min_p)
    return apply_min_p_torch(logits, min_p)


def apply_top_k_top_p(
    logits: torch.Tensor,
    k: torch.Tensor | None,
    p: torch.Tensor | None,
    max_k: int | None = None,
) -> torch.Tensor:
    """Mask logits outside each row's top-k / top-p set (Triton kernel on CUDA, else `apply_top_k_top_p_torch`)."""
    if k is None and p is None:
        return logits
    kern = _kernel_module(logits)
    if kern is not None:
        return kern.top_k_top_p_min_p_triton(logits, k, p, None)
    return apply_top_k_top_p_torch(logits, k, p, max_k=max_k)


def apply_min_p_torch(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens with prob < min_p * max_prob, in place.

    Done in logit space (l_i - l_max < log(min_p)) so no softmax is needed; min_p = 0 gives log = -inf,
    which masks nothing, so mixed batches need no special-casing.
    """
    max_logit = logits.amax(dim=-1, keepdim=True)
    threshold = max_logit + torch.log(min_p.to(logits.dtype)).unsqueeze(1)
    return logits.masked_fill_(logits < threshold, _NEG_INF)


def apply_top_k_top_p_torch(
    logits: torch.Tensor,
    k: torch.Tensor | None,
    p: torch.Tensor | None,
    max_k: int | None = None,
) -> torch.Tensor:
    """Reference. Mask logits [B, V] outside each row's top-k / top-p set (k: [B] int, 0 or >= V = off; p: [B], 1.0 = off).

    Top-k only uses torch.topk (no full sort); `max_k` (largest k in the batch, known on the host) avoids a
    device sync to find it. Top-p needs the sorted distribution, so it sorts once and applies both filters.
    May modify `logits` in place; callers use the returned tensor.
    """
    if k is None and p is None:
        return logits
    vocab_size = logits.shape[1]
    if p is None:
        return _apply_top_k_only(logits, k, max_k)

    logits_sort, logits_idx = logits.sort(dim=-1, descending=False)
    if k is not None:
        k_eff = torch.where((k <= 0) | (k > vocab_size), vocab_size, k).to(torch.long)
        # The k-th largest value sits at ascending position V - k; keep everything >= it (ties included).
        kth = logits_sort.gather(1, (vocab_size - k_eff).unsqueeze(1))
        logits_sort.masked_fill_(logits_sort < kth, _NEG_INF)

    probs_sort = logits_sort.softmax(dim=-1)
    cum = probs_sort.cumsum(dim=-1)
    # Drop the low tail whose total mass is <= 1 - p; the best token always survives.
    drop = cum <= (1.0 - p.to(cum.dtype)).unsqueeze(1)
    drop[:, -1] = False
    logits_sort.masked_fill_(drop, _NEG_INF)
    return logits.scatter_(1, logits_idx, logits_sort)


def _apply_top_k_only(logits: torch.Tensor, k: torch.Tensor, max_k: int | None) -> torch.Tensor:
    vocab_size = logits.shape[1]
    k_eff = torch.where((k <= 0) | (k > vocab_size), vocab_size, k).to(torch.long)
    if max_k is None:
        max_k = int(k_eff.max())  # device sync; the Sampler passes max_k to avoid it
    max_k = max(1, min(int(max_k), vocab_size))
    top_vals = logits.topk(max_k, dim=-1).values
    # Rows with k off (k_eff = V > max_k possible) get threshold -inf: nothing masked.
    off = k_eff > max_k
    kth = top_vals.gather(1, (k_eff.clamp(max=max_k) - 1).unsqueeze(1))
    kth = kth.masked_fill_(off.unsqueeze(1), _NEG_INF)
    return logits.masked_fill_(logits < kth, _NEG_INF)


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
    return probs.div_(q).argmax(dim=-1).view(-1)



def skip_random_draws(generator: torch.Generator, num_steps: int, vocab_size: int, device: torch.device) -> None:
    """Advance a seeded row's generator past `num_steps` draws of `random_sample` (a request resumed after
    preemption then continues with the same random stream as if it had never been preempted)."""
    q = torch.empty(vocab_size, dtype=torch.float32, device=device)
    for _ in range(num_steps):
        q.exponential_(generator=generator)
