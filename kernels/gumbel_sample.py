"""Random sampling straight from the logits in one pass: argmax_i(logits_i / T - log q_i), q_i ~ Exp(1).

This is the exponential race the Sampler uses (vllm_lite.sample.topk_topp.random_sample: argmax(softmax(x) / q)) with
the softmax dropped: log is monotone and every token of a row shares the softmax's normaliser, so the winner is the
same. The torch path makes six float32 passes over [B, V] (copy, divide, softmax, noise, divide, argmax: ~0.9 ms per
step at batch 256 with a 152k vocabulary on an H100); this kernel reads the logits once in their own dtype and draws
the noise in registers (Philox, `tl.rand`), so the step pays one read of the logits.

Rows are split into fixed chunks (programs = rows x chunks; one compiled variant for every batch size); each program
writes its best (value, index) and a tiny torch reduction picks the winner per row (first index on ties, as argmax).
Greedy rows (temperature 0) in a mixed batch take no noise: plain argmax of the logits. Rows with their own seeded
generator are not served here (the Sampler keeps the torch path for them, which draws from that generator).

`q` may be passed instead of drawing the noise in the kernel: then the result equals the torch reference
`gumbel_sample_torch` on the same q exactly (the correctness test); in production the noise is drawn in-kernel from a
seed taken from torch's CPU generator, so `torch.manual_seed` still makes runs reproducible.
"""
from __future__ import annotations

import torch

try:  # triton is optional (CPU installs); the CUDA path needs it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

HAS_TRITON = triton is not None
_BLOCK = 2048
_CHUNK_BLOCKS = 8  # a program scans 16k tokens: a 152k vocabulary is 10 programs per row (one shape compiled)


def gumbel_sample_torch(logits: torch.Tensor, temperature: torch.Tensor, is_greedy: torch.Tensor,
                        q: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: [B, V] logits, [B] temperature (1.0 on greedy rows), [B] bool greedy rows -> [B] int64 ids."""
    x = logits.float() / temperature.unsqueeze(1)
    if q is None:
        q = torch.empty_like(x).exponential_()
    x = torch.where(is_greedy.unsqueeze(1), x, x - q.log())
    return x.argmax(dim=-1).view(-1)


if HAS_TRITON:
    @triton.jit
    def _take_best(base, qbase, cols, V, t, noisy, r, best_v, best_i, HAS_Q: tl.constexpr):
        """One quarter tile: tempered logits minus log q (q = -log u from the random bits r, or read from q)."""
        mask = cols < V
        x = tl.load(base + cols, mask=mask, other=float("-inf")).to(tl.float32) / t
        if HAS_Q:
            q = tl.load(qbase + cols, mask=mask, other=1.0)
        else:
            q = -tl.log(tl.random.uint_to_uniform_float(r))
        x = tl.where(noisy, x - tl.log(q), x)
        x = tl.where(mask, x, float("-inf"))
        take = x > best_v  # strict: a lane keeps its earliest index on ties
        return tl.where(take, x, best_v), tl.where(take, cols, best_i)

    @triton.jit
    def _gumbel_kernel(logits_ptr, stride_row, temp_ptr, greedy_ptr, q_ptr, stride_q, seed, V,
                       best_val_ptr, best_idx_ptr, num_chunks, HAS_Q: tl.constexpr, BLOCK: tl.constexpr,
                       CHUNK_BLOCKS: tl.constexpr):
        # A tile of BLOCK tokens is four quarters; one Philox call (randint4x) draws the noise of all four, a
        # quarter of the integer work of one call per token (the kernel is bound by that work, not by the read).
        Q: tl.constexpr = BLOCK // 4
        row = tl.program_id(0)
        c = tl.program_id(1)
        t = tl.load(temp_ptr + row)
        noisy = tl.load(greedy_ptr + row) == 0
        base = logits_ptr + row.to(tl.int64) * stride_row
        qbase = q_ptr + row.to(tl.int64) * stride_q
        offs = tl.arange(0, Q)
        best_v = tl.full([Q], float("-inf"), tl.float32)
        best_i = tl.zeros([Q], tl.int32)
        for k in range(CHUNK_BLOCKS):  # the last chunk may pass V
            b = (c * CHUNK_BLOCKS + k) * BLOCK
            # Offsets row*V + b + [0, Q): distinct for every in-range token (b + offs < V there). With HAS_Q the
            # bits are unused (the compiler drops the call).
            r0, r1, r2, r3 = tl.randint4x(seed, row * V + b + offs)
            best_v, best_i = _take_best(base, qbase, b + offs, V, t, noisy, r0, best_v, best_i, HAS_Q)
            best_v, best_i = _take_best(base, qbase, b + Q + offs, V, t, noisy, r1, best_v, best_i, HAS_Q)
            best_v, best_i = _take_best(base, qbase, b + 2 * Q + offs, V, t, noisy, r2, best_v, best_i, HAS_Q)
            best_v, best_i = _take_best(base, qbase, b + 3 * Q + offs, V, t, noisy, r3, best_v, best_i, HAS_Q)
        m = tl.max(best_v, axis=0)
        # First index among the lanes holding the maximum (argmax semantics); a row of -inf keeps its start.
        i = tl.min(tl.where(best_v == m, best_i, 2147483647), axis=0)
        i = tl.where(m == float("-inf"), c * CHUNK_BLOCKS * BLOCK, i)
        tl.store(best_val_ptr + row * num_chunks + c, m)
        tl.store(best_idx_ptr + row * num_chunks + c, i)


def gumbel_sample_triton(logits: torch.Tensor, temperature: torch.Tensor, is_greedy: torch.Tensor,
                         q: torch.Tensor | None = None, seed: int | None = None, block: int = _BLOCK,
                         chunk_blocks: int = _CHUNK_BLOCKS, num_warps: int = 8) -> torch.Tensor:
    """Same contract as `gumbel_sample_torch`; logits may be bf16/fp16/fp32 with unit stride along the vocabulary.
    block / chunk_blocks / num_warps: tiling (the defaults suit a 150k vocabulary; bench/kernels.py sweeps them;
    the interpreter tests use small tiles)."""
    b, v = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if b * v >= 2**31:
        raise ValueError(f"batch {b} x vocabulary {v} too large for 32-bit Philox offsets")
    num_chunks = triton.cdiv(v, chunk_blocks * block)
    best_val = torch.empty(b, num_chunks, dtype=torch.float32, device=logits.device)
    best_idx = torch.empty(b, num_chunks, dtype=torch.int32, device=logits.device)
    if q is None and seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())  # torch's CPU generator: no device sync
    _gumbel_kernel[(b, num_chunks)](
        logits, logits.stride(0), temperature, is_greedy, q if q is not None else logits,
        q.stride(0) if q is not None else 0, seed or 0, v, best_val, best_idx, num_chunks,
        HAS_Q=q is not None, BLOCK=block, CHUNK_BLOCKS=chunk_blocks, num_warps=num_warps)
    if num_chunks == 1:
        return best_idx.view(-1).long()
    winner = best_val.argmax(dim=1, keepdim=True)
    return best_idx.gather(1, winner).view(-1).long()

