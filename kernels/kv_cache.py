"""Paged KV-cache write: k, v [T, Hkv, D] -> kv_cache [num_blocks, 2, block_size, Hkv, D] at slot_mapping.

One Triton program per token copies that token's Hkv * D keys and values (vectorised, with a dtype cast) into
slot `slot_mapping[t]`; slot -1 marks a padding row and is skipped inside the kernel (no host sync, so it is
CUDA-graph safe and needs no index juggling for padded batches). Any cache strides work as long as the head
dimension is contiguous, so the same kernel serves the torch backend's and FlashInfer's NHD layout.

`write_kv_cache` dispatches to Triton on CUDA (unless the caller turns the kernel off: KernelConfig.kv_write_kernel)
and to the plain-PyTorch reference `write_kv_cache_torch` elsewhere; the torch attention backend writes with the
reference.
"""
from __future__ import annotations

import torch

try:  # triton is optional (CPU installs); the CUDA path needs it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None
    tl = None

__all__ = ["write_kv_cache", "write_kv_cache_triton", "write_kv_cache_torch", "HAS_TRITON"]

HAS_TRITON = triton is not None
_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


def write_kv_cache_torch(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                         block_size: int) -> None:
    """Reference: scatter k, v [T, Hkv, D] into their slots (every slot must be valid: no -1 padding rows)."""
    blk = torch.div(slot_mapping, block_size, rounding_mode="floor")
    off = slot_mapping % block_size
    kv_cache[blk, 0, off] = k.to(kv_cache.dtype)
    kv_cache[blk, 1, off] = v.to(kv_cache.dtype)


if HAS_TRITON:

    @triton.jit
    def _cast(x, ty: tl.constexpr):
        if x.dtype.primitive_bitwidth > ty.primitive_bitwidth:
            return x.to(ty, fp_downcast_rounding="rtne")  # torch's rounding (round to nearest even)
        else:
            return x.to(ty)

    @triton.jit
    def _kv_write_kernel(
        k_ptr, v_ptr, cache_ptr, slot_ptr,
        k_stride_t, k_stride_h, v_stride_t, v_stride_h,
        c_stride_blk, c_stride_kv, c_stride_slot, c_stride_h,
        block_size,
        H: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        blk = slot // block_size
        off = slot % block_size
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        # a full-shape mask (the interpreter rejects broadcast masks)
        mask = (h < H) & (d < D) & (tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.int64) + slot >= 0)
        kx = tl.load(k_ptr + t * k_stride_t + h * k_stride_h + d, mask=mask)
        vx = tl.load(v_ptr + t * v_stride_t + h * v_stride_h + d, mask=mask)
        dst = cache_ptr + blk * c_stride_blk + off * c_stride_slot + h * c_stride_h + d
        ty = cache_ptr.dtype.element_ty
        tl.store(dst, _cast(kx, ty), mask=mask)
        tl.store(dst + c_stride_kv, _cast(vx, ty), mask=mask)


def write_kv_cache_triton(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                          block_size: int) -> None:
    """Triton write (rows with slot -1 are skipped). Requires the head dimension contiguous in k, v and cache."""
    t, h, d = k.shape
    if v.shape != k.shape or kv_cache.shape[1] != 2 or kv_cache.shape[2] != block_size or \
            tuple(kv_cache.shape[3:]) != (h, d):
        raise ValueError(f"write_kv_cache: k {tuple(k.shape)} v {tuple(v.shape)} cache {tuple(kv_cache.shape)} "
                         f"block_size {block_size}")
    if slot_mapping.shape[0] < t:
        raise ValueError("slot_mapping shorter than k")
    if t == 0:
        return
    if k.stride(2) != 1:
        k = k.contiguous()
    if v.stride(2) != 1:
        v = v.contiguous()
    assert kv_cache.stride(4) == 1, "kv_cache head dimension must be contiguous"
    cs = kv_cache.stride()
    block_h, block_d = triton.next_power_of_2(h), triton.next_power_of_2(d)
    num_warps = 4 if block_h * block_d >= 1024 else 1
    _kv_write_kernel[(t,)](
        k, v, kv_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cs[0], cs[1], cs[2], cs[3],
        block_size,
        H=h, D=d, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=num_warps,
    )


def _use_triton(k: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    return (HAS_TRITON and k.is_cuda and kv_cache.dtype in _SUPPORTED and k.dtype in _SUPPORTED
            and kv_cache.stride(4) == 1)


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                   block_size: int, use_kernel: bool = True) -> None:
    """Scatter k, v [T, Hkv, D] into kv_cache [num_blocks, 2, block_size, Hkv, D] at slot_mapping [>= T] (int64/int32).

    CUDA (and use_kernel): Triton kernel, slot -1 = padding row, skipped (graph safe). Elsewhere, or with
    use_kernel=False (KernelConfig.kv_write_kernel): the torch reference, which expects every slot valid (slice off
    padding rows first).
    """
    if use_kernel and _use_triton(k, kv_cache):
        write_kv_cache_triton(k, v, kv_cache, slot_mapping, block_size)
    else:
        write_kv_cache_torch(k, v, kv_cache, slot_mapping[: k.shape[0]], block_size)
