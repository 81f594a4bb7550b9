"""Per-head q/k RMSNorm (Qwen3), rotary embedding and the paged KV-cache write of k and v, in one Triton launch.

Without it a layer runs inductor's two reductions and two pointwise kernels for q/k norm + rotary, a copy of v and
a separate KV-cache write; a decode step of a small model is mostly launch gaps between such tiny kernels inside
the CUDA graph (docs/PERF.md), so they are worth merging.

`qk_norm_rope_cache_triton(q, k, v, cos, sin, q_weight, k_weight, eps, head_dim, kv_cache, slot_mapping,
block_size, num_write)` takes q [T, Hq*D], k and v [T, Hkv*D] (views of the fused qkv projection are fine: only
the last dimension must be contiguous), cos/sin [T, rot_dim / 2] in the activation dtype, and returns q normed and
rotated ([T, Hq*D], contiguous) while k (normed and rotated) and v go straight into
kv_cache [num_blocks, 2, block_size, Hkv, D] at slot_mapping for the first `num_write` rows (slot -1 = padding
row, skipped: CUDA-graph safe). One program handles one head of 1 token (batches below 128), 2 (128-511) or 8
(prefill chunks); q heads and k/v heads share the launch.

The arithmetic follows the eager reference operation by operation (`rms_norm_ref` and `apply_rotary` below, which
are also the eager implementations of vllm_lite.layers' RMSNorm and rotary): statistics in float32, the normalised
value rounded to the activation dtype before the weight multiply, every product / sum of the rotation rounded to the
activation dtype as eager bf16 code does. `qk_norm_rope_cache_torch` is that reference (plus the reference KV write).
"""
from __future__ import annotations

import torch

from vllm_lite.kernels.kv_cache import write_kv_cache_torch

try:  # triton is optional (CPU installs); the CUDA path needs it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

HAS_TRITON = triton is not None
# Tokens per program by batch: 2 from 128 rows, 8 from 512 (prefill chunks); measured on the H100 (docs/PERF.md).
_TWO_TOKENS_FROM, _EIGHT_TOKENS_FROM = 128, 512

__all__ = ["apply_rotary", "rms_norm_ref", "qk_norm_rope_torch", "qk_norm_rope_cache_torch",
           "qk_norm_rope_cache_triton", "HAS_TRITON"]


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Plain-PyTorch RMSNorm, operation for operation like transformers' LlamaRMSNorm (so logits match HF)."""
    dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, head_dim]; cos, sin: [T, 1, rot_dim/2] -> rotate-half rotary on the first rot_dim channels, the
    same arithmetic as HF's x * cos + rotate_half(x) * sin."""
    half = cos.shape[-1]
    rot = 2 * half
    x1, x2 = x[..., :half], x[..., half:rot]
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    if rot < x.shape[-1]:
        rotated = torch.cat([rotated, x[..., rot:]], dim=-1)
    return rotated


def qk_norm_rope_torch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float,
                       head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: q [T, Hq*D], k [T, Hkv*D], cos/sin [T, rot/2] -> (q, k) normed (if weights) and rotated."""
    t, q_size, kv_size = q.shape[0], q.shape[1], k.shape[1]
    # Explicit sizes (no -1): the token count is an unbacked symbol under torch.compile.
    qh, kh = q.reshape(t, q_size // head_dim, head_dim), k.reshape(t, kv_size // head_dim, head_dim)
    if q_weight is not None:
        qh, kh = rms_norm_ref(qh, q_weight, eps), rms_norm_ref(kh, k_weight, eps)
    c, s = cos[:, None, :], sin[:, None, :]
    return apply_rotary(qh, c, s).reshape(t, q_size), apply_rotary(kh, c, s).reshape(t, kv_size)


def qk_norm_rope_cache_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                             sin: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
                             eps: float, head_dim: int, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                             block_size: int, num_write: int) -> torch.Tensor:
    """Reference of the fused kernel: norm + rotary, then the KV write of the first num_write rows (slots >= 0)."""
    q, k = qk_norm_rope_torch(q, k, cos, sin, q_weight, k_weight, eps, head_dim)
    t = q.shape[0]
    k3 = k.reshape(t, k.shape[1] // head_dim, head_dim)[:num_write]
    v3 = v.reshape(t, v.shape[1] // head_dim, head_dim)[:num_write]
    slots = slot_mapping[:num_write]
    valid = slots >= 0
    write_kv_cache_torch(k3[valid], v3[valid], kv_cache, slots[valid], block_size)
    return q


if HAS_TRITON:

    @triton.jit
    def _round(x, ty: tl.constexpr):
        """Round float32 to the activation dtype and back: what an eager op in that dtype stores."""
        if ty == tl.float32:
            return x
        elif ty == tl.bfloat16:
            # Round-to-nearest-even on the bits: a cast pair to bf16 and back may be folded away by the compiler,
            # which would leave fp32 (FMA-contracted) arithmetic that differs from eager in ~1/4 of the values.
            u = x.to(tl.uint32, bitcast=True)
            u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
            return u.to(tl.float32, bitcast=True)
        else:
            return x.to(ty, fp_downcast_rounding="rtne").to(tl.float32)

    @triton.jit
    def _cast(x, ty: tl.constexpr):
        if ty == tl.float32:
            return x
        else:
            return x.to(ty, fp_downcast_rounding="rtne")

    # Token counts vary per step (prefill lengths): not specialised, so an unseen count never compiles a variant.
    @triton.jit(do_not_specialize=["num_tokens", "num_write"])
    def _qk_norm_rope_cache_kernel(
            q_ptr, k_ptr, v_ptr, qo_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, cache_ptr, slot_ptr,
            q_stride_t, k_stride_t, v_stride_t, cs_stride_t, eps, num_tokens, num_write, block_size,
            c_stride_blk, c_stride_kv, c_stride_slot, c_stride_h,
            HQ: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, TAIL: tl.constexpr, BLOCK_T: tl.constexpr,
            BLOCK_HALF: tl.constexpr, BLOCK_TAIL: tl.constexpr, BLOCK_D: tl.constexpr, NORM: tl.constexpr):
        # One program: BLOCK_T tokens of one head (rows of the 2-D tiles below are tokens).
        t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
        tm = t < num_tokens
        h = tl.program_id(1)
        is_q = h < HQ
        hk = h - HQ
        if is_q:
            src = q_ptr + t[:, None] * q_stride_t + h * D
            w_ptr = qw_ptr
        else:
            src = k_ptr + t[:, None] * k_stride_t + hk * D
            w_ptr = kw_ptr
        ty = qo_ptr.dtype.element_ty
        i = tl.arange(0, BLOCK_HALF)[None, :]
        m = tm[:, None] & (i < HALF)
        x1 = tl.load(src + i, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF + i, mask=m, other=0.0).to(tl.float32)
        j = tl.arange(0, BLOCK_TAIL)[None, :]
        mt = tm[:, None] & (j < TAIL)
        xt = tl.load(src + 2 * HALF + j, mask=mt, other=0.0).to(tl.float32)
        if NORM:
            var = (tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1) + tl.sum(xt * xt, axis=1)) / D
            r = tl.rsqrt(var + eps)[:, None]
            w1 = tl.load(w_ptr + i, mask=i < HALF, other=0.0).to(tl.float32)
            w2 = tl.load(w_ptr + HALF + i, mask=i < HALF, other=0.0).to(tl.float32)
            wt = tl.load(w_ptr + 2 * HALF + j, mask=j < TAIL, other=0.0).to(tl.float32)
            x1 = _round(w1 * _round(x1 * r, ty), ty)
            x2 = _round(w2 * _round(x2 * r, ty), ty)
            xt = _round(wt * _round(xt * r, ty), ty)
        c = tl.load(cos_ptr + t[:, None] * cs_stride_t + i, mask=m, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + t[:, None] * cs_stride_t + i, mask=m, other=0.0).to(tl.float32)
        o1 = _round(_round(x1 * c, ty) - _round(x2 * s, ty), ty)
        o2 = _round(_round(x2 * c, ty) + _round(x1 * s, ty), ty)
        if is_q:
            dst = qo_ptr + (t[:, None] * HQ + h) * D
            tl.store(dst + i, o1.to(ty), mask=m)
            tl.store(dst + HALF + i, o2.to(ty), mask=m)
            tl.store(dst + 2 * HALF + j, xt.to(ty), mask=mt)
        else:
            slot = tl.load(slot_ptr + t, mask=tm, other=-1).to(tl.int64)
            wm = ((slot >= 0) & (t < num_write))[:, None]
            cty = cache_ptr.dtype.element_ty
            dst = (cache_ptr + (slot // block_size) * c_stride_blk + (slot % block_size) * c_stride_slot
                   + hk * c_stride_h)[:, None]
            tl.store(dst + i, _cast(o1, cty), mask=wm & (i < HALF))
            tl.store(dst + HALF + i, _cast(o2, cty), mask=wm & (i < HALF))
            tl.store(dst + 2 * HALF + j, _cast(xt, cty), mask=wm & (j < TAIL))
            d = tl.arange(0, BLOCK_D)[None, :]
            vx = tl.load(v_ptr + t[:, None] * v_stride_t + hk * D + d, mask=wm & (d < D))
            tl.store(dst + c_stride_kv + d, _cast(vx, cty), mask=wm & (d < D))


def qk_norm_rope_cache_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                              sin: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
                              eps: float, head_dim: int, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                              block_size: int, num_write: int, block_t: int | None = None,
                              num_warps: int | None = None) -> torch.Tensor:
    """The fused kernel (same contract as qk_norm_rope_cache_torch). block_t tokens per program: 1 for decode-sized
    batches (most programs), several for prefill chunks, where one-token programs leave the memory system idle."""
    t = q.shape[0]
    hq, hk = q.shape[1] // head_dim, k.shape[1] // head_dim
    half = cos.shape[-1]
    if sin.shape != cos.shape or sin.stride() != cos.stride() or 2 * half > head_dim or v.shape != k.shape:
        raise ValueError(f"qk_norm_rope_cache: q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)} "
                         f"cos {tuple(cos.shape)} sin {tuple(sin.shape)} head_dim {head_dim}")
    if kv_cache.shape[1] != 2 or kv_cache.shape[2] != block_size or tuple(kv_cache.shape[3:]) != (hk, head_dim) \
            or kv_cache.stride(4) != 1:
        raise ValueError(f"qk_norm_rope_cache: cache {tuple(kv_cache.shape)} for {hk} x {head_dim}")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    qo = torch.empty(t, hq * head_dim, dtype=q.dtype, device=q.device)
    if t == 0:
        return qo
    norm = q_weight is not None
    tail = head_dim - 2 * half
    cs = kv_cache.stride()
    if block_t is None:
        block_t = 1 if t < _TWO_TOKENS_FROM else 2 if t < _EIGHT_TOKENS_FROM else 8
    if num_warps is None:
        num_warps = (1 if block_t <= 2 else 2) * (1 if head_dim <= 128 else 2)
    _qk_norm_rope_cache_kernel[(triton.cdiv(t, block_t), hq + hk)](
        q, k, v, qo, cos, sin, q_weight if norm else q, k_weight if norm else k, kv_cache, slot_mapping,
        q.stride(0), k.stride(0), v.stride(0), cos.stride(0), eps, t, num_write, block_size,
        cs[0], cs[1], cs[2], cs[3],
        HQ=hq, D=head_dim, HALF=half, TAIL=tail, BLOCK_T=block_t, BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_TAIL=max(triton.next_power_of_2(tail), 2), BLOCK_D=triton.next_power_of_2(head_dim), NORM=norm,
        num_warps=num_warps)
    return qo
