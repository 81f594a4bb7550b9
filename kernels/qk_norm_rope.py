"""Per-head q/k RMSNorm (Qwen3) and rotary embedding in one Triton launch, instead of inductor's four kernels.

`qk_norm_rope(q, k, cos, sin, q_weight, k_weight, eps)` takes q [T, Hq*D] and k [T, Hkv*D] (views of the fused qkv
projection are fine: only the last dimension must be contiguous) and returns new contiguous tensors with, per head,
RMSNorm (when weights are given) and then rotate-half rotary applied to the first `rot_dim` channels (cos, sin:
[T, rot_dim / 2] in the activation dtype). One program handles one (token, head); q and k heads share the launch.

The arithmetic follows the eager reference operation by operation (vllm_lite.layers.norm.rms_norm_ref and
vllm_lite.layers.rotary.apply_rotary): statistics in float32, the normalised value rounded to the activation dtype before the
weight multiply, and every product / sum of the rotation rounded to the activation dtype as eager bf16 code does,
so compiled and eager runs agree. Fewer kernels per layer matter because a decode step of a small model is mostly
launch gaps between tiny kernels inside the CUDA graph (docs/PERF.md).

On CUDA (with triton) the model calls it through the opaque custom op `vllm_lite::qk_norm_rope`; elsewhere
`qk_norm_rope_torch`, the reference, runs.
"""
from __future__ import annotations

import torch

from vllm_lite.layers.norm import rms_norm_ref
from vllm_lite.layers.rotary import apply_rotary

try:  # triton is optional (CPU installs); the CUDA path needs it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

HAS_TRITON = triton is not None

__all__ = ["qk_norm_rope", "qk_norm_rope_torch", "qk_norm_rope_triton", "HAS_TRITON"]


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


if HAS_TRITON:

    @triton.jit
    def _round(x, ty: tl.constexpr):
        """Round float32 to the activation dtype and back: what an eager op in that dtype stores."""
        if ty == tl.float32:
            return x
        else:
            return x.to(ty, fp_downcast_rounding="rtne").to(tl.float32)

    @triton.jit
    def _qk_norm_rope_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr,
                             q_stride_t, k_stride_t, cs_stride_t, eps,
                             HQ: tl.constexpr, HK: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
                             TAIL: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_TAIL: tl.constexpr,
                             NORM: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        if h < HQ:
            src = q_ptr + t * q_stride_t + h * D
            dst = qo_ptr + (t * HQ + h) * D
            w_ptr = qw_ptr
        else:
            src = k_ptr + t * k_stride_t + (h - HQ) * D
            dst = ko_ptr + (t * HK + (h - HQ)) * D
            w_ptr = kw_ptr
        ty = qo_ptr.dtype.element_ty
        i = tl.arange(0, BLOCK_HALF)
        m = i < HALF
        x1 = tl.load(src + i, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF + i, mask=m, other=0.0).to(tl.float32)
        j = tl.arange(0, BLOCK_TAIL)
        mt = j < TAIL
        xt = tl.load(src + 2 * HALF + j, mask=mt, other=0.0).to(tl.float32)
        if NORM:
            var = (tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0) + tl.sum(xt * xt, axis=0)) / D
            r = tl.rsqrt(var + eps)
            w1 = tl.load(w_ptr + i, mask=m, other=0.0).to(tl.float32)
            w2 = tl.load(w_ptr + HALF + i, mask=m, other=0.0).to(tl.float32)
            wt = tl.load(w_ptr + 2 * HALF + j, mask=mt, other=0.0).to(tl.float32)
            x1 = _round(w1 * _round(x1 * r, ty), ty)
            x2 = _round(w2 * _round(x2 * r, ty), ty)
            xt = _round(wt * _round(xt * r, ty), ty)
        c = tl.load(cos_ptr + t * cs_stride_t + i, mask=m, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + t * cs_stride_t + i, mask=m, other=0.0).to(tl.float32)
        o1 = _round(_round(x1 * c, ty) - _round(x2 * s, ty), ty)
        o2 = _round(_round(x2 * c, ty) + _round(x1 * s, ty), ty)
        tl.store(dst + i, o1.to(ty), mask=m)
        tl.store(dst + HALF + i, o2.to(ty), mask=m)
        tl.store(dst + 2 * HALF + j, xt.to(ty), mask=mt)


def qk_norm_rope_triton(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float,
                        head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel (same contract as qk_norm_rope_torch; the last dimension of q, k, cos, sin contiguous)."""
    t = q.shape[0]
    hq, hk = q.shape[1] // head_dim, k.shape[1] // head_dim
    half = cos.shape[-1]
    if sin.shape != cos.shape or sin.stride() != cos.stride() or 2 * half > head_dim:
        raise ValueError(f"qk_norm_rope: cos {tuple(cos.shape)} / sin {tuple(sin.shape)} for head_dim {head_dim}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    qo = torch.empty(t, hq * head_dim, dtype=q.dtype, device=q.device)
    ko = torch.empty(t, hk * head_dim, dtype=k.dtype, device=k.device)
    if t == 0:
        return qo, ko
    norm = q_weight is not None
    tail = head_dim - 2 * half
    _qk_norm_rope_kernel[(t, hq + hk)](
        q, k, qo, ko, cos, sin, q_weight if norm else q, k_weight if norm else k,
        q.stride(0), k.stride(0), cos.stride(0), eps,
        HQ=hq, HK=hk, D=head_dim, HALF=half, TAIL=tail, BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_TAIL=max(triton.next_power_of_2(tail), 2), NORM=norm, num_warps=1 if head_dim <= 128 else 2)
    return qo, ko


@torch.library.custom_op("vllm_lite::qk_norm_rope", mutates_args=())
def _qk_norm_rope_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float,
                     head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    return qk_norm_rope_triton(q, k, cos, sin, q_weight, k_weight, eps, head_dim)


@_qk_norm_rope_op.register_fake
def _(q, k, cos, sin, q_weight, k_weight, eps, head_dim):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float,
                 head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel (as an opaque custom op) on CUDA with triton, else the torch reference."""
    if HAS_TRITON and q.is_cuda and cos.dtype == q.dtype:
        return torch.ops.vllm_lite.qk_norm_rope(q, k, cos, sin, q_weight, k_weight, eps, head_dim)
    return qk_norm_rope_torch(q, k, cos, sin, q_weight, k_weight, eps, head_dim)
