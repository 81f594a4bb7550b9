"""Attention over a paged KV cache where every query row carries its own request and position.

An EAGLE draft head's proposal loop runs inside captured CUDA graphs, where the rows' positions exist only on the
device: no attention plan can be built from host-side lengths. Here each row t reads request row_req[t] of the
block table and attends causally to that request's positions 0 .. positions[t] (its own K/V already written), with
no host synchronisation in either path.

`rows_attention_triton`: one program per (row, kv head) loads that kv head's GROUP = Hq // Hkv query heads and
walks the row's keys in BLOCK_N-token tiles (the loop bound is read from positions inside the kernel), block ids
looked up per token in the block table, online softmax in float32. Scores and the weighted sum use broadcast
products and tl.sum rather than tl.dot, so GROUP sizes of 1-4 work and the Triton interpreter runs it.
With few programs (a batch-1 proposal: T x Hkv = 3 on the default model) one walk per row leaves the GPU idle, so the
keys are split flash-decoding style: SPLITS programs per (row, kv head) each take a contiguous share of the row's
tiles (the shares are cut from the loaded position, so a graph replays with any length) and store an unnormalised
partial (max, sum, accumulator); a second kernel merges them. SPLITS depends only on shapes, never on positions.
`rows_attention_torch` is the plain-PyTorch reference (gather the request's blocks, mask, softmax).

kv_cache is [num_blocks, 2, block_size, Hkv, D] (0 = keys, 1 = values), head dimension contiguous: the torch and
FlashInfer backends' layout. A row with positions[t] < 0 attends to nothing and returns zeros; positions past the
block table's capacity are clamped to it.
"""
from __future__ import annotations

import torch

try:  # triton is optional (CPU installs); the CUDA path needs it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None
    tl = None

__all__ = ["rows_attention", "rows_attention_torch", "rows_attention_triton", "split_count", "HAS_TRITON"]

HAS_TRITON = triton is not None
_TILE_ELEMS = 8192  # GROUP_P * BLOCK_N * D_P: the broadcast product's size per tile (register budget)
_TARGET_PROGRAMS = 256  # programs worth launching (~2 per SM on an H100 / H200): fewer rows x kv heads split keys
_MAX_SPLITS = 16  # the merge walks the shares serially: 64 cost more than they saved (H200, bench/kernel_bench.py rows)


def rows_attention_torch(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, row_req: torch.Tensor,
                         positions: torch.Tensor, scale: float) -> torch.Tensor:
    """Reference: q [T, Hq, D] -> [T, Hq, D] in q's dtype, softmax in float32; no host sync."""
    t, hq, d = q.shape
    bs, hkv = kv_cache.shape[2], kv_cache.shape[3]
    blocks = kv_cache[block_table[row_req.long()].long()]  # [T, max_blocks, 2, bs, Hkv, D]
    n = blocks.shape[1] * bs
    k = blocks[:, :, 0].reshape(t, n, hkv, d).float()
    v = blocks[:, :, 1].reshape(t, n, hkv, d).float()
    qg = q.float().reshape(t, hkv, hq // hkv, d)
    s = torch.einsum("tkgd,tnkd->tkgn", qg, k) * scale
    valid = (torch.arange(n, device=q.device)[None, :] <= positions.to(q.device)[:, None])[:, None, None, :]
    p = torch.softmax(s.masked_fill(~valid, float("-inf")), dim=-1).masked_fill(~valid, 0.0)  # no keys: zeros
    return torch.einsum("tkgn,tnkd->tkgd", p, v).reshape(t, hq, d).to(q.dtype)


if HAS_TRITON:

    # Nothing per step is an argument (T is the grid, positions are loaded), so no do_not_specialize is needed.
    @triton.jit
    def _rows_attention_kernel(
        q_ptr, cache_ptr, bt_ptr, req_ptr, pos_ptr, out_ptr, part_ptr, ml_ptr,
        q_stride_t, q_stride_h, o_stride_t, o_stride_h, bt_stride, max_blocks, num_kv_heads,
        c_stride_blk, c_stride_kv, c_stride_slot, c_stride_h, qk_scale,
        GROUP: tl.constexpr, D: tl.constexpr, GROUP_P: tl.constexpr, D_P: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, SPLITS: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        kh = tl.program_id(1).to(tl.int64)
        sp = tl.program_id(2).to(tl.int64)
        req = tl.load(req_ptr + t).to(tl.int64)
        kv_len = tl.minimum(tl.load(pos_ptr + t).to(tl.int64) + 1, max_blocks * BLOCK_SIZE)
        g = tl.arange(0, GROUP_P)
        d = tl.arange(0, D_P)
        qm = (g < GROUP)[:, None] & (d < D)[None, :]
        qh = kh * GROUP + g
        q = tl.load(q_ptr + t * q_stride_t + qh[:, None] * q_stride_h + d[None, :], mask=qm, other=0.0)
        q = q.to(tl.float32) * qk_scale  # scale * log2(e): exp2 below
        m_i = tl.full([GROUP_P], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([GROUP_P], dtype=tl.float32)
        acc = tl.zeros([GROUP_P, D_P], dtype=tl.float32)
        row_blocks = bt_ptr + req * bt_stride
        # This program's share of the keys: whole tiles, contiguous, from the loaded length (SPLITS = 1: all).
        per_split = ((kv_len + BLOCK_N - 1) // BLOCK_N + SPLITS - 1) // SPLITS * BLOCK_N
        start = sp * per_split
        end = tl.minimum(start + per_split, kv_len)
        # A while loop: the interpreter cannot take a loaded scalar as range()'s bound (with numpy >= 2.4).
        while start < end:  # every tile holds at least one valid key, so m_i turns finite in the first
            n = start + tl.arange(0, BLOCK_N)
            nm = n < end
            blk = tl.load(row_blocks + n // BLOCK_SIZE, mask=nm, other=0).to(tl.int64)
            base = cache_ptr + blk * c_stride_blk + (n % BLOCK_SIZE) * c_stride_slot + kh * c_stride_h
            kvm = nm[:, None] & (d < D)[None, :]  # a full-shape mask (the interpreter rejects broadcast masks)
            k = tl.load(base[:, None] + d[None, :], mask=kvm, other=0.0).to(tl.float32)
            v = tl.load(base[:, None] + c_stride_kv + d[None, :], mask=kvm, other=0.0).to(tl.float32)
            s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [GROUP_P, BLOCK_N]
            s = tl.where(nm[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            m_i = m_new
            start += BLOCK_N
        if SPLITS == 1:
            out = tl.where((l_i > 0.0)[:, None], acc / tl.maximum(l_i, 1e-30)[:, None], 0.0)  # no keys: zeros
            tl.store(out_ptr + t * o_stride_t + qh[:, None] * o_stride_h + d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=qm)
        else:  # the partial, unnormalised (a share without keys stores max -inf, sum 0)
            slot = (t * num_kv_heads + kh) * SPLITS + sp
            tl.store(part_ptr + (slot * GROUP_P + g[:, None]) * D_P + d[None, :], acc)
            tl.store(ml_ptr + (slot * 2) * GROUP_P + g, m_i)
            tl.store(ml_ptr + (slot * 2 + 1) * GROUP_P + g, l_i)

    @triton.jit
    def _rows_attention_merge_kernel(
        part_ptr, ml_ptr, out_ptr, o_stride_t, o_stride_h, num_kv_heads,
        GROUP: tl.constexpr, D: tl.constexpr, GROUP_P: tl.constexpr, D_P: tl.constexpr, SPLITS: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        kh = tl.program_id(1).to(tl.int64)
        g = tl.arange(0, GROUP_P)
        d = tl.arange(0, D_P)
        m_i = tl.full([GROUP_P], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([GROUP_P], dtype=tl.float32)
        acc = tl.zeros([GROUP_P, D_P], dtype=tl.float32)
        first = (t * num_kv_heads + kh) * SPLITS
        for s in range(SPLITS):
            m_s = tl.load(ml_ptr + ((first + s) * 2) * GROUP_P + g)
            l_s = tl.load(ml_ptr + ((first + s) * 2 + 1) * GROUP_P + g)
            a_s = tl.load(part_ptr + ((first + s) * GROUP_P + g[:, None]) * D_P + d[None, :])
            m_new = tl.maximum(m_i, m_s)
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no keys yet on either side: weights 0, not nan
            alpha = tl.exp2(m_i - m_ref)
            beta = tl.exp2(m_s - m_ref)
            l_i = l_i * alpha + l_s * beta
            acc = acc * alpha[:, None] + a_s * beta[:, None]
            m_i = m_new
        out = tl.where((l_i > 0.0)[:, None], acc / tl.maximum(l_i, 1e-30)[:, None], 0.0)
        qm = (g < GROUP)[:, None] & (d < D)[None, :]
        qh = kh * GROUP + g
        tl.store(out_ptr + t * o_stride_t + qh[:, None] * o_stride_h + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=qm)


def rows_attention_triton(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, row_req: torch.Tensor,
                          positions: torch.Tensor, scale: float, block_n: int | None = None,
                          num_warps: int | None = None, splits: int | None = None) -> torch.Tensor:
    """Triton kernel (same contract as rows_attention_torch); block_n / num_warps / splits override the choice of
    tile and of key splits per (row, kv head) (`split_count`)."""
    if not HAS_TRITON:
        raise RuntimeError("rows_attention_triton needs triton (pip install triton)")
    t, hq, d = q.shape
    bs, hkv = kv_cache.shape[2], kv_cache.shape[3]
    if kv_cache.shape[1] != 2 or kv_cache.shape[4] != d or hq % hkv or kv_cache.stride(4) != 1 \
            or block_table.dim() != 2 or row_req.shape[0] != t or positions.shape[0] != t:
        raise ValueError(f"rows_attention: q {tuple(q.shape)} cache {tuple(kv_cache.shape)} (strides "
                         f"{kv_cache.stride()}) block_table {tuple(block_table.shape)} row_req "
                         f"{tuple(row_req.shape)} positions {tuple(positions.shape)}")
    if q.stride(2) != 1:
        q = q.contiguous()
    if block_table.stride(1) != 1:
        block_table = block_table.contiguous()
    out = torch.empty(t, hq, d, dtype=q.dtype, device=q.device)
    if t == 0:
        return out
    group = hq // hkv
    group_p, d_p = triton.next_power_of_2(group), triton.next_power_of_2(d)
    if block_n is None:
        block_n = max(16, min(128, triton.next_power_of_2(max(1, _TILE_ELEMS // (group_p * d_p)))))
    if num_warps is None:
        num_warps = 4 if group_p * block_n * d_p >= 4096 else 2
    if splits is None:
        splits = split_count(t, hkv, block_table.shape[1] * bs, block_n)
    if splits > 1:  # float32 partials, every slot written by the first kernel
        part = torch.empty(t * hkv * splits * group_p * d_p, dtype=torch.float32, device=q.device)
        ml = torch.empty(t * hkv * splits * 2 * group_p, dtype=torch.float32, device=q.device)
    else:
        part = ml = out
    cs = kv_cache.stride()
    _rows_attention_kernel[(t, hkv, splits)](
        q, kv_cache, block_table, row_req, positions, out, part, ml,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_table.stride(0), block_table.shape[1], hkv,
        cs[0], cs[1], cs[2], cs[3], scale * 1.4426950408889634,
        GROUP=group, D=d, GROUP_P=group_p, D_P=d_p, BLOCK_N=block_n, BLOCK_SIZE=bs, SPLITS=splits,
        num_warps=num_warps,
    )
    if splits > 1:
        _rows_attention_merge_kernel[(t, hkv)](
            part, ml, out, out.stride(0), out.stride(1), hkv,
            GROUP=group, D=d, GROUP_P=group_p, D_P=d_p, SPLITS=splits, num_warps=2 if group_p * d_p <= 512 else 4,
        )
    return out


def split_count(rows: int, kv_heads: int, max_len: int, block_n: int) -> int:
    """Key splits per (row, kv head): enough programs to fill the GPU (`_TARGET_PROGRAMS`), never more splits
    than the block table has tiles. A power of two, from shapes only (CUDA-graph safe)."""
    want = _TARGET_PROGRAMS // max(1, rows * kv_heads)
    tiles = -(-max_len // block_n)
    splits = 1
    while splits * 2 <= min(want, tiles, _MAX_SPLITS):
        splits *= 2
    return splits


def rows_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, row_req: torch.Tensor,
                   positions: torch.Tensor, scale: float, use_kernel: bool | None = None) -> torch.Tensor:
    """Per-row paged attention: q [T, Hq, D], kv_cache [num_blocks, 2, block_size, Hkv, D], block_table
    [R, max_blocks] int32, row_req [T] (request of each row), positions [T] int64 (row t attends to its request's
    positions 0 .. positions[t]) -> [T, Hq, D] in q's dtype. use_kernel None: Triton on CUDA when triton imports,
    else the torch reference; True / False force one. No host sync on CUDA in either path (CUDA-graph safe); on
    the CPU the reference reads only the blocks up to the largest position."""
    if use_kernel is None:
        use_kernel = HAS_TRITON and q.is_cuda
    if use_kernel:
        return rows_attention_triton(q, kv_cache, block_table, row_req, positions, scale)
    if not q.is_cuda and positions.numel():  # no graphs to break on the CPU: gather only the blocks in use
        used = int(positions.max()) // kv_cache.shape[2] + 1
        block_table = block_table[:, : max(1, min(used, block_table.shape[1]))]
    return rows_attention_torch(q, kv_cache, block_table, row_req, positions, scale)
