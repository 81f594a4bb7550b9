"""Verifying draft tokens against the target's distributions: a Triton kernel (one program per request) and its
plain-PyTorch reference, which take the same inputs and return the same tokens.

Request i verifies k_i drafts with 1 + k_i rows (row offsets[i] + j: the target's distribution after draft j - 1).
- Greedy requests accept drafts while they equal the row's argmax (`greedy_tokens`, computed by the caller), then
  take the argmax of the first mismatching row, or of the bonus row after k_i matches.
- Random requests accept draft d_j with probability min(1, p_j(d_j) / q_j(d_j)) (u_j * q < p with u_j uniform in
  [0, 1)); q_j is the drafter's distribution (`draft_probs` [S, K, V]) or, when None, a point mass on d_j (n-gram,
  suffix: then the rule is u_j < p_j(d_j)). At the first rejection the token is drawn from max(p_j - q_j, 0)
  normalised, after k_i acceptances from the bonus row's p; either draw is argmax(weights / noise) with the
  caller's Exp(1) `noise` [R, V] (the exponential race: categorical sampling without a cumsum). A residual without
  mass (p_j == q_j) cannot reject; should rounding make it, the draft itself is kept.
The output is [S, K + 1] int64: the accepted drafts then the final token, -1 after it. Probabilities come from the
caller (temperature, filters, penalties, grammar: torch code before this step).
"""
from __future__ import annotations

import torch

try:  # triton is optional (CPU installs); the CUDA path needs it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

__all__ = ["verify_drafts", "verify_drafts_torch", "verify_drafts_triton", "warm_up_verify_kernel", "HAS_TRITON"]

HAS_TRITON = triton is not None


def verify_drafts(drafts: torch.Tensor, num_drafts: torch.Tensor, offsets: torch.Tensor,
                  greedy_tokens: torch.Tensor, is_greedy: torch.Tensor | None, probs: torch.Tensor | None,
                  draft_probs: torch.Tensor | None, uniforms: torch.Tensor | None, noise: torch.Tensor | None,
                  use_kernel: bool | None = None) -> torch.Tensor:
    """The kernel on CUDA (use_kernel None: whenever triton is there), else the reference. Shapes: drafts [S, K]
    int64 (entries past num_drafts[i] ignored), num_drafts / offsets [S] int64, greedy_tokens [R] int64,
    is_greedy [S] bool (None: all greedy, and probs / uniforms / noise may be None), probs / noise [R, V] float32,
    draft_probs [S, K, V] float32 or None, uniforms [S, K] float32."""
    if use_kernel is None:
        use_kernel = HAS_TRITON and drafts.is_cuda
    fn = verify_drafts_triton if use_kernel else verify_drafts_torch
    return fn(drafts, num_drafts, offsets, greedy_tokens, is_greedy, probs, draft_probs, uniforms, noise)


def verify_drafts_torch(drafts: torch.Tensor, num_drafts: torch.Tensor, offsets: torch.Tensor,
                        greedy_tokens: torch.Tensor, is_greedy: torch.Tensor | None, probs: torch.Tensor | None,
                        draft_probs: torch.Tensor | None, uniforms: torch.Tensor | None,
                        noise: torch.Tensor | None) -> torch.Tensor:
    """Reference (batched torch, no per-request loop)."""
    s, k = drafts.shape
    device = drafts.device
    pos = torch.arange(k + 1, device=device)
    has = pos[None, :k] < num_drafts[:, None]
    rows = offsets[:, None] + torch.minimum(pos[None, :], num_drafts[:, None])  # [S, K + 1]
    d = torch.where(has, drafts, 0)
    accept = d == greedy_tokens[rows[:, :k]]
    if is_greedy is not None:
        p_d = probs[rows[:, :k], d]
        q_d = 1.0 if draft_probs is None else draft_probs.gather(2, d[:, :, None])[:, :, 0]
        accept = torch.where(is_greedy[:, None], accept, uniforms * q_d < p_d)
    accept &= has
    n_acc = torch.cumprod(accept.to(torch.int64), dim=1).sum(dim=1)  # [S]
    final_row = rows.gather(1, n_acc[:, None])[:, 0]
    final = greedy_tokens[final_row]
    if is_greedy is not None:
        rejected = n_acc < num_drafts
        at = torch.clamp(n_acc, max=max(k - 1, 0))
        d_at = d.gather(1, at[:, None])[:, 0] if k else torch.zeros_like(n_acc)
        p = probs[final_row]
        if draft_probs is None:
            q = torch.zeros_like(p).scatter_(1, d_at[:, None], 1.0)
        else:
            q = draft_probs[torch.arange(s, device=device), at]
        weights = torch.where(rejected[:, None], torch.clamp(p - q, min=0.0), p)
        score = weights / noise[final_row]
        best, sampled = score.max(dim=1)
        sampled = torch.where(rejected & (best <= 0), d_at, sampled)
        final = torch.where(is_greedy, final, sampled)
    tokens = torch.where(pos[None, :k] < n_acc[:, None], d, -1)
    tokens = torch.cat([tokens, torch.full((s, 1), -1, dtype=torch.int64, device=device)], dim=1)
    return tokens.scatter_(1, n_acc[:, None], final[:, None])


if HAS_TRITON:
    @triton.jit
    def _verify_kernel(out_ptr, drafts_ptr, num_drafts_ptr, offsets_ptr, greedy_ptr, is_greedy_ptr, probs_ptr,
                       draft_probs_ptr, u_ptr, noise_ptr, V: tl.constexpr, K: tl.constexpr,
                       ALL_GREEDY: tl.constexpr, HAS_DRAFT_PROBS: tl.constexpr, BLOCK_V: tl.constexpr):
        # V and K are compile-time (one vocabulary per model, K <= 15): the Triton CPU interpreter cannot loop to a
        # runtime bound.
        i = tl.program_id(0).to(tl.int64)
        n = tl.load(num_drafts_ptr + i)
        off = tl.load(offsets_ptr + i)
        if ALL_GREEDY:
            greedy = n >= 0  # True, as a tensor like the other branch's
        else:
            greedy = tl.load(is_greedy_ptr + i) != 0
        n_acc = n * 0
        for j in range(0, K):
            if (n_acc == j) & (j < n):  # every draft before j was accepted
                d = tl.load(drafts_ptr + i * K + j)
                row = off + j
                if greedy:
                    ok = d == tl.load(greedy_ptr + row)
                else:
                    p = tl.load(probs_ptr + row * V + d)
                    if HAS_DRAFT_PROBS:
                        q = tl.load(draft_probs_ptr + (i * K + j) * V + d)
                    else:
                        q = 1.0
                    ok = tl.load(u_ptr + i * K + j) * q < p
                if ok:
                    tl.store(out_ptr + i * (K + 1) + j, d)
                    n_acc += 1
        row = off + n_acc
        if greedy:
            tok = tl.load(greedy_ptr + row)
        else:
            rejected = n_acc < n
            at = tl.minimum(n_acc, K - 1)
            d_at = tl.load(drafts_ptr + i * K + at)
            best_val = -1.0
            best_idx = n_acc * 0
            for v0 in range(0, V, BLOCK_V):
                idx = v0 + tl.arange(0, BLOCK_V)
                m = idx < V
                p = tl.load(probs_ptr + row * V + idx, mask=m, other=0.0)
                if HAS_DRAFT_PROBS:
                    q = tl.load(draft_probs_ptr + (i * K + at) * V + idx, mask=m, other=0.0)
                else:
                    q = tl.where(idx == d_at, 1.0, 0.0)
                w = tl.where(rejected, tl.maximum(p - q, 0.0), p)
                e = tl.load(noise_ptr + row * V + idx, mask=m, other=1.0)
                score = tl.where(m, w / e, -1.0)
                blk_val = tl.max(score, axis=0)
                blk_idx = tl.argmax(score, axis=0)
                if blk_val > best_val:
                    best_val = blk_val
                    best_idx = (v0 + blk_idx).to(tl.int64)
            tok = tl.where(rejected & (best_val <= 0.0), d_at, best_idx)
        tl.store(out_ptr + i * (K + 1) + n_acc, tok)


def verify_drafts_triton(drafts: torch.Tensor, num_drafts: torch.Tensor, offsets: torch.Tensor,
                         greedy_tokens: torch.Tensor, is_greedy: torch.Tensor | None, probs: torch.Tensor | None,
                         draft_probs: torch.Tensor | None, uniforms: torch.Tensor | None,
                         noise: torch.Tensor | None, block_v: int = 1024) -> torch.Tensor:
    """One program per request; the vocabulary is scanned in blocks of `block_v` only for a random request's
    final token."""
    s, k = drafts.shape
    if k == 0:
        raise ValueError("verify_drafts_triton needs drafts of width >= 1")
    out = torch.full((s, k + 1), -1, dtype=torch.int64, device=drafts.device)
    if s == 0:
        return out
    all_greedy = is_greedy is None
    vocab = 1 if all_greedy else probs.shape[1]
    # Stand-ins of the right dtypes for inputs the constexpr flags never read.
    fdummy = torch.zeros(1, dtype=torch.float32, device=drafts.device)
    _verify_kernel[(s,)](
        out, drafts.contiguous(), num_drafts.contiguous(), offsets.contiguous(), greedy_tokens.contiguous(),
        torch.ones(1, dtype=torch.int8, device=drafts.device) if all_greedy else is_greedy.to(torch.int8).contiguous(),
        fdummy if all_greedy else probs.contiguous(),
        draft_probs.contiguous() if draft_probs is not None else fdummy,
        fdummy if all_greedy else uniforms.contiguous(),
        fdummy if all_greedy else noise.contiguous(),
        V=vocab, K=k, ALL_GREEDY=all_greedy, HAS_DRAFT_PROBS=draft_probs is not None,
        BLOCK_V=min(block_v, triton.next_power_of_2(vocab)))
    return out


def warm_up_verify_kernel(k: int, vocab: int, device: torch.device, draft_probs: bool = False) -> None:
    """Compile the kernel's variants for drafts of width k (greedy; random with point-mass and, if `draft_probs`,
    with the drafter's q) before the first verification: a Triton compile on the serving path stalls that step for
    up to seconds."""
    if not (HAS_TRITON and device.type == "cuda" and k > 0):
        return
    drafts = torch.zeros(1, k, dtype=torch.int64, device=device)
    num = torch.full((1,), k, dtype=torch.int64, device=device)
    off = torch.zeros(1, dtype=torch.int64, device=device)
    greedy = torch.zeros(k + 1, dtype=torch.int64, device=device)
    verify_drafts_triton(drafts, num, off, greedy, None, None, None, None, None)
    probs = torch.full((k + 1, vocab), 1.0 / vocab, device=device)
    uniforms = torch.rand(1, k, device=device)
    noise = torch.ones(k + 1, vocab, device=device)
    is_greedy = torch.zeros(1, dtype=torch.bool, device=device)
    verify_drafts_triton(drafts, num, off, greedy, is_greedy, probs, None, uniforms, noise)
    if draft_probs:
        q = torch.full((1, k, vocab), 1.0 / vocab, device=device)
        verify_drafts_triton(drafts, num, off, greedy, is_greedy, probs, q, uniforms, noise)
