"""y = x @ w.T for decode-sized batches (M <= 16 rows): a weight-streaming Triton kernel.

At M = 1..16 a projection GEMM is a read of its weight: Qwen3-0.6B's are 4-12 MB each, and cuBLAS reaches only a
quarter (H200) to a half (H100) of the copy bandwidth on them (docs/PERF.md, `kernels:gemm`), which makes the GEMMs
about half of an L1 decode step. Here every program owns BLOCK_N output columns for all M rows and streams its
[BLOCK_N, K] slice of the weight exactly once (K is a compile-time constant: one variant per projection shape),
accumulating in float32 either by multiply-accumulate into a [BLOCK_M, BLOCK_N, BLOCK_K] tile reduced once after the
K loop, which allows column blocks of 8 (N = 1024 still gives every SM a program), or with tl.dot (rows padded to 16,
column blocks of >= 16). BLOCK_N defaults to the widest that still covers the GPU's SMs.

On the H200 (docs/PERF.md, `python bench/kernel_bench.py --only skinny`) it streams a Qwen3-0.6B step's projections at
1.55 TB/s for M = 1 against cuBLAS's 1.08; tl.dot wins at M = 3-4; from M = 8 cuBLAS ties, so it keeps those.
"""
from __future__ import annotations

import torch

try:  # triton is optional (CPU installs)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

HAS_TRITON = triton is not None
MAX_ROWS = 16
# Where the kernel beats cuBLAS (docs/PERF.md, `bench/kernel_bench.py --only skinny`): up to this many rows, this setting,
# for weights up to Qwen3-0.6B's largest (6144 x 1024); larger ones were not measured and stay with cuBLAS.
_ROW_CONFIGS: tuple[tuple[int, dict], ...] = ((2, {"block_n": 8, "block_k": 512}),
                                              (4, {"use_dot": True, "block_k": 256, "num_stages": 4}))
_MAX_WEIGHT_NUMEL = 6144 * 1024


def decode_config(rows: int, n: int, k: int) -> dict | None:
    """The measured-best kernel setting for a [rows, k] x [n, k] projection, or None where cuBLAS is faster."""
    if n * k > _MAX_WEIGHT_NUMEL:
        return None
    for max_rows, config in _ROW_CONFIGS:
        if rows <= max_rows:
            return config
    return None


def skinny_gemm_torch(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Reference: [M, K] x [N, K] weight -> [M, N] in x's dtype, accumulated in float32."""
    return (x.float() @ w.float().t()).to(x.dtype)


if HAS_TRITON:
    @triton.jit
    def _skinny_gemm_kernel(x_ptr, w_ptr, y_ptr, M, N, stride_xm, stride_wn, stride_ym, K: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            USE_DOT: tl.constexpr, EVEN_N: tl.constexpr):
        pid = tl.program_id(0)
        rows = tl.arange(0, BLOCK_M)
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        row_ok = rows < M
        col_ok = cols < N
        w_ptrs = w_ptr + cols[:, None].to(tl.int64) * stride_wn + ks[None, :]
        x_ptrs = x_ptr + rows[:, None] * stride_xm + ks[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # Multiply-accumulate keeps a [M, N, K] tile of partial products and reduces it once after the loop: a
        # reduction per iteration serialises the loads behind shuffles.
        part = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + ks) < K
            x = tl.load(x_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            if EVEN_N and K % BLOCK_K == 0:
                w = tl.load(w_ptrs + k0, eviction_policy="evict_first")
            else:
                w = tl.load(w_ptrs + k0, mask=col_ok[:, None] & k_ok[None, :], other=0.0,
                            eviction_policy="evict_first")
            if USE_DOT:  # tensor cores: rows padded to 16, free in a memory-bound kernel
                acc = tl.dot(x.to(w.dtype), tl.trans(w), acc)
            else:
                part += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
        if not USE_DOT:
            acc = tl.sum(part, axis=2)
        tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


def _block_n(n: int, num_sms: int) -> int:
    """The widest power-of-two column block (8..64) that still gives every SM a program."""
    block = 64
    while block > 8 and triton.cdiv(n, block) < num_sms:
        block //= 2
    return block


def skinny_gemm_triton(x: torch.Tensor, w: torch.Tensor, block_n: int | None = None, block_k: int | None = None,
                       num_warps: int = 4, num_sms: int = 132, use_dot: bool = False,
                       num_stages: int | None = None) -> torch.Tensor:
    """Same contract as `skinny_gemm_torch` for M <= MAX_ROWS rows; x and w need unit stride along K.
    use_dot: accumulate with tl.dot (rows padded to 16, column blocks of >= 16) instead of multiply-accumulate."""
    m, k = x.shape
    n = w.shape[0]
    # tl.dot takes float32 operands as TF32 (10-bit mantissas): a float32 model's projections at 3-4 rows then
    # differed from cuBLAS's by 1e-3 in logprobs (a speculating run, whose partial steps have few rows, against the
    # plain run). Float32 weights multiply-accumulate in float32 instead.
    use_dot = use_dot and w.dtype != torch.float32
    if m > MAX_ROWS or w.shape[1] != k or x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError(f"skinny_gemm: x {tuple(x.shape)} w {tuple(w.shape)} (M <= {MAX_ROWS}, unit K stride)")
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    block_m = 16 if use_dot else max(triton.next_power_of_2(m), 1)
    block_n = max(block_n or _block_n(n, num_sms), 16 if use_dot else 1)
    # Register budget of multiply-accumulate: a BLOCK_M x BLOCK_N x BLOCK_K float32 tile, 32 values a thread.
    budget = 32 * 32 * num_warps
    block_k = block_k or (128 if use_dot else max(16, min(1024, budget // (block_m * block_n))))
    block_k = min(block_k, triton.next_power_of_2(k))
    extra = {} if num_stages is None else {"num_stages": num_stages}
    _skinny_gemm_kernel[(triton.cdiv(n, block_n),)](x, w, y, m, n, x.stride(0), w.stride(0), y.stride(0), K=k,
                                                     BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                                                     USE_DOT=use_dot, EVEN_N=n % block_n == 0, num_warps=num_warps,
                                                     **extra)
    return y
