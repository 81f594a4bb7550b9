"""Top-k / top-p / min-p masking without sorting the vocabulary: a Triton threshold search, one program per row.

Every filter keeps the tokens whose logit is >= a per-row threshold, so the kernel only has to find that
threshold. It works on an order-preserving int32 key of each float32 logit (-0.0 folded into +0.0, NaN treated as
-inf) and finds, by a 16-way search over key space, the largest key t with F(t) >= target, where F(t) is
  * top-k: the number of tokens with key >= t (target k)      -> t = the k-th largest logit, ties kept;
  * top-p: the softmax mass of tokens with key >= t (target p * mass of the top-k set)
           -> t = the smallest logit whose strictly-greater mass is < p: vLLM's "smallest descending prefix whose
              mass reaches p", the best token always kept, and (unlike a sort) ties at the boundary all kept.
Each search pass reads the row once and evaluates 16 pivots (alternately spaced in value and in key space, the
interval also shrinks to the min/max key actually inside it), so a row costs a handful of L2-resident passes
instead of a segmented sort + softmax + cumsum + scatter. Min-p is the lower bound max + log(min_p) (log taken
with torch on the host side of the launch, as the reference does) and restricts the other two, in the
reference's order: min-p -> top-k -> top-p. The last pass writes -inf below the threshold, in place.

The plain-PyTorch references `apply_min_p_torch` / `apply_top_k_top_p_torch` live here too (vLLM semantics: top-k
keeps ties of the k-th largest logit, top-p the smallest descending prefix whose mass reaches p, min-p the tokens with
probability >= min_p * max probability). `apply_top_k_top_p` / `apply_min_p` dispatch to the kernel when the caller
asks for it (use_kernel: the Sampler passes KernelConfig.sampling_kernel) and the logits are on CUDA, else to the
references; `top_k_top_p_min_p` applies all three (one launch on the kernel path).
"""
from __future__ import annotations

import torch

try:  # triton is optional (CPU installs); the CUDA path needs it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

__all__ = ["apply_top_k_top_p", "apply_min_p", "top_k_top_p_min_p", "top_k_top_p_min_p_triton",
           "apply_top_k_top_p_torch", "apply_min_p_torch", "HAS_TRITON", "kernel_supports"]

HAS_TRITON = triton is not None
_NEG_INF = float("-inf")


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
    """Reference. Mask logits [B, V] outside each row's top-k / top-p set (k: [B] int, 0 or >= V = off;
    p: [B], 1.0 = off).

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


if HAS_TRITON:
    _INT_MIN = tl.constexpr(-2147483648)
    _INT_MAX = tl.constexpr(2147483647)

    @triton.jit
    def _to_key(x):
        """float32 -> int32 with the same order (NaN -> key of -inf, -0.0 -> key of +0.0)."""
        x = tl.where(x != x, float("-inf"), x)
        x = tl.where(x == 0.0, 0.0, x)
        b = x.to(tl.int32, bitcast=True)
        return tl.where(b < 0, b ^ 0x7FFFFFFF, b)

    @triton.jit
    def _from_key(key):
        b = tl.where(key < 0, key ^ 0x7FFFFFFF, key)
        return b.to(tl.float32, bitcast=True)

    @triton.jit
    def _search(row_ptr, V: tl.constexpr, lo, hi, target_cnt, target_mass, m,
                BY_MASS: tl.constexpr, BLOCK: tl.constexpr, NPIV: tl.constexpr):
        """Largest key t in [lo, hi] with F(t) >= target, given F(lo) >= target (F = count, or mass if BY_MASS,
        of keys >= t)."""
        j = tl.arange(0, NPIV)
        it = lo * 0
        while lo < hi:
            lo64 = lo.to(tl.int64)
            hi64 = hi.to(tl.int64)
            kpiv = lo64 + ((hi64 - lo64 + 1) * j) // NPIV
            lo_v = tl.maximum(_from_key(lo), -1e30)
            hi_v = tl.minimum(_from_key(hi), 1e30)
            vpiv = _to_key(lo_v + (hi_v - lo_v) * (j.to(tl.float32) / NPIV)).to(tl.int64)
            vpiv = tl.minimum(tl.maximum(vpiv, lo64 + j), hi64)
            use_val = (it % 3) != 2
            piv = tl.where(use_val, vpiv, kpiv)
            piv = tl.where(j == 0, lo64, piv).to(tl.int32)

            cnt = tl.zeros([NPIV], dtype=tl.int32)
            mass = tl.zeros([NPIV], dtype=tl.float32)
            mn = tl.full([BLOCK], _INT_MAX, tl.int32)
            mx = tl.full([BLOCK], _INT_MIN, tl.int32)
            for start in range(0, V, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                valid = offs < V
                x = tl.load(row_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)
                key = tl.where(valid, _to_key(x), _INT_MIN)  # pivots are > INT_MIN: padding never counts
                ge = key[:, None] >= piv[None, :]
                if BY_MASS:
                    e = tl.exp(x - m)
                    mass += tl.sum(tl.where(ge, e[:, None], 0.0), axis=0)
                else:
                    cnt += tl.sum(ge.to(tl.int32), axis=0)
                inside = valid & (key >= lo) & (key <= hi)
                mn = tl.minimum(mn, tl.where(inside, key, _INT_MAX))
                mx = tl.maximum(mx, tl.where(inside, key, _INT_MIN))
            if BY_MASS:
                ok = mass >= target_mass
            else:
                ok = cnt >= target_cnt
            ok = ok | (j == 0)
            a = tl.max(tl.where(ok, j, 0), axis=0)
            new_lo = tl.max(tl.where(j == a, piv, _INT_MIN), axis=0)
            nxt = tl.min(tl.where(j == a + 1, piv, _INT_MAX), axis=0)
            new_hi = tl.where(a == NPIV - 1, hi, nxt - 1)
            lo = tl.maximum(new_lo, tl.min(mn, axis=0))
            hi = tl.minimum(new_hi, tl.max(mx, axis=0))
            it += 1
        return lo

    @triton.jit
    def _topk_topp_minp_kernel(logits_ptr, stride_row, V: tl.constexpr, k_ptr, p_ptr, lmp_ptr,
                               HAS_K: tl.constexpr, HAS_P: tl.constexpr, HAS_MINP: tl.constexpr,
                               BLOCK: tl.constexpr, NPIV: tl.constexpr):
        row = tl.program_id(0)
        row_ptr = logits_ptr + row.to(tl.int64) * stride_row
        no = row < 0  # a False scalar tensor
        do_k = no
        do_p = no
        do_minp = no
        k = V
        p = 1.0
        lmp = float("-inf")
        if HAS_K:
            k64 = tl.load(k_ptr + row).to(tl.int64)
            do_k = (k64 > 0) & (k64 < V)
            k = tl.where(do_k, k64, V).to(tl.int32)
        if HAS_P:
            p = tl.load(p_ptr + row).to(tl.float32)
            do_p = p < 1.0
        if HAS_MINP:
            lmp = tl.load(lmp_ptr + row).to(tl.float32)
            do_minp = lmp > float("-inf")

        if do_k | do_p | do_minp:
            # pass 0: row max and smallest key
            mvec = tl.full([BLOCK], float("-inf"), tl.float32)
            kmin_vec = tl.full([BLOCK], _INT_MAX, tl.int32)
            for start in range(0, V, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                valid = offs < V
                x = tl.load(row_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)
                x = tl.where(x != x, float("-inf"), x)
                mvec = tl.maximum(mvec, x)
                kmin_vec = tl.minimum(kmin_vec, tl.where(valid, _to_key(x), _INT_MAX))
            m = tl.max(mvec, axis=0)
            kmax = _to_key(m)
            kmin = tl.min(kmin_vec, axis=0)
            lower = tl.where(do_minp, _to_key(m + lmp), kmin)  # min-p: keep logits >= max + log(min_p)
            lower = tl.maximum(lower, kmin)
            cnt_l = V + row * 0
            mass_l = tl.full([], 0.0, tl.float32)
            if m > float("-inf"):
                # pass 1 (only when needed): count and softmax mass of the tokens min-p keeps
                if do_p | (do_minp & do_k):
                    cvec = tl.zeros([BLOCK], dtype=tl.int32)
                    svec = tl.zeros([BLOCK], dtype=tl.float32)
                    for start in range(0, V, BLOCK):
                        offs = start + tl.arange(0, BLOCK)
                        valid = offs < V
                        x = tl.load(row_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)
                        keep = valid & (_to_key(x) >= lower)
                        cvec += keep.to(tl.int32)
                        svec += tl.where(keep, tl.exp(x - m), 0.0)
                    cnt_l = tl.sum(cvec, axis=0)
                    mass_l = tl.sum(svec, axis=0)
                thr = lower
                if do_k & (cnt_l > k):
                    # k == 1: the max (with its ties) is the answer, no search needed
                    thr = _search(row_ptr, V, tl.where(k == 1, kmax, lower), kmax, k, 0.0, m,
                                  False, BLOCK, NPIV)
                    if do_p:  # softmax mass of the top-k set (the top-p target is relative to it)
                        svec = tl.zeros([BLOCK], dtype=tl.float32)
                        for start in range(0, V, BLOCK):
                            offs = start + tl.arange(0, BLOCK)
                            valid = offs < V
                            x = tl.load(row_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)
                            svec += tl.where(valid & (_to_key(x) >= thr), tl.exp(x - m), 0.0)
                        mass_l = tl.sum(svec, axis=0)
                if do_p:
                    thr = _search(row_ptr, V, thr, kmax, k, p * mass_l, m, True, BLOCK, NPIV)
                # final pass: -inf below the threshold (only the dropped entries are written)
                for start in range(0, V, BLOCK):
                    offs = start + tl.arange(0, BLOCK)
                    valid = offs < V
                    x = tl.load(row_ptr + offs, mask=valid, other=float("-inf"))
                    drop = valid & (_to_key(x.to(tl.float32)) < thr)
                    neg_inf = tl.full([BLOCK], float("-inf"), tl.float32).to(row_ptr.dtype.element_ty)
                    tl.store(row_ptr + offs, neg_inf, mask=drop)


def top_k_top_p_min_p_triton(logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None,
                             min_p: torch.Tensor | None, *, block: int = 1024, npiv: int = 16,
                             num_warps: int = 8) -> torch.Tensor:
    """In place: mask logits [B, V] (fp32/bf16/fp16, rows contiguous) outside min-p, then top-k, then top-p.

    k: [B] int (0 or >= V = off), p: [B] float (1.0 = off), min_p: [B] float (0.0 = off); None = off for all rows.
    Returns `logits`. No host sync (CUDA-graph safe).
    """
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError("logits must be [B, V] with contiguous rows")
    b, v = logits.shape
    if b == 0 or (k is None and p is None and min_p is None):
        return logits
    dummy = logits
    lmp = torch.log(min_p.to(torch.float32)) if min_p is not None else None
    _topk_topp_minp_kernel[(b,)](
        logits, logits.stride(0), v,
        k if k is not None else dummy,
        p.to(torch.float32) if p is not None else dummy,
        lmp if lmp is not None else dummy,
        HAS_K=k is not None, HAS_P=p is not None, HAS_MINP=min_p is not None,
        BLOCK=block, NPIV=npiv, num_warps=num_warps,
    )
    return logits


def kernel_supports(logits: torch.Tensor) -> bool:
    """True when the Triton path can run on these logits: triton importable, CUDA, [B, V] fp32/bf16/fp16 rows."""
    return (HAS_TRITON and logits.is_cuda and logits.dim() == 2 and logits.stride(1) == 1
            and logits.dtype in (torch.float32, torch.float16, torch.bfloat16))


def top_k_top_p_min_p(logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None,
                      min_p: torch.Tensor | None, max_k: int | None = None, use_kernel: bool = False) -> torch.Tensor:
    """min-p -> top-k -> top-p, in one launch on the kernel path; the references elsewhere. May modify logits in
    place."""
    if use_kernel and kernel_supports(logits):
        return top_k_top_p_min_p_triton(logits, k, p, min_p)
    if min_p is not None:
        logits = apply_min_p_torch(logits, min_p)
    return apply_top_k_top_p_torch(logits, k, p, max_k=max_k)


def apply_top_k_top_p(logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None,
                      max_k: int | None = None, use_kernel: bool = False) -> torch.Tensor:
    """Mask logits outside each row's top-k / top-p set (the kernel with use_kernel on CUDA, else the reference)."""
    if k is None and p is None:
        return logits
    if use_kernel and kernel_supports(logits):
        return top_k_top_p_min_p_triton(logits, k, p, None)
    return apply_top_k_top_p_torch(logits, k, p, max_k=max_k)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor, use_kernel: bool = False) -> torch.Tensor:
    """Mask tokens with prob < min_p * max_prob (the kernel with use_kernel on CUDA, else the reference)."""
    if use_kernel and kernel_supports(logits):
        return top_k_top_p_min_p_triton(logits, None, None, min_p)
    return apply_min_p_torch(logits, min_p)
