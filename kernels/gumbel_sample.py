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
    def _gumbel_kernel(logits_ptr, stride_row, temp_ptr, greedy_ptr, q_ptr, stride_q, seed, V,
                       best_val_ptr, best_idx_ptr, num_chunks, HAS_Q: tl.constexpr, BLOCK: tl.constexpr,
                       CHUNK_BLOCKS: tl.constexpr):
        row = tl.program_id(0)
        c = tl.program_id(1)
        t = tl.load(temp_ptr + row)
        noisy = tl.load(greedy_ptr + row) == 0
        start = c * (CHUNK_BLOCKS * BLOCK)
        best_v = float("-inf")
        best_i = start
        offs = tl.arange(0, BLOCK)
        for k in range(CHUNK_BLOCKS):  # the last chunk may pass V
            b = start + k * BLOCK
            cols = b + offs
            mask = cols < V
            x = tl.load(logits_ptr + row.to(tl.int64) * stride_row + cols, mask=mask, other=float("-inf"))
            x = x.to(tl.float32) / t
            if HAS_Q:
                q = tl.load(q_ptr + row.to(tl.int64) * stride_q + cols, mask=mask, other=1.0)
            else:
                q = -tl.log(tl.rand(seed, row * V + cols))
            x = tl.where(noisy, x - tl.log(q), x)
            x = tl.where(mask, x, float("-inf"))
            m = tl.max(x, axis=0)
            i = tl.argmax(x, axis=0) + b
            take = m > best_v
            best_v = tl.where(take, m, best_v)
            best_i = tl.where(take, i, best_i)
        tl.store(best_val_ptr + row * num_chunks + c, best_v)
        tl.store(best_idx_ptr + row * num_chunks + c, best_i)


def gumbel_sample_triton(logits: torch.Tensor, temperature: torch.Tensor, is_greedy: torch.Tensor,
                         q: torch.Tensor | None = None, seed: int | None = None, block: int = _BLOCK,
                         chunk_blocks: int = _CHUNK_BLOCKS) -> torch.Tensor:
    """Same contract as `gumbel_sample_torch`; logits may be bf16/fp16/fp32 with unit stride along the vocabulary.
    block / chunk_blocks: tile sizes (the defaults suit a 150k vocabulary; tests on the interpreter use small ones)."""
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
        HAS_Q=q is not None, BLOCK=block, CHUNK_BLOCKS=chunk_blocks, num_warps=8)
    if num_chunks == 1:
        return best_idx.view(-1).long()
    winner = best_val.argmax(dim=1, keepdim=True)
    return best_idx.gather(1, winner).view(-1).long()


def gumbel_sample(logits: torch.Tensor, temperature: torch.Tensor, is_greedy: torch.Tensor) -> torch.Tensor:
    """The kernel on CUDA with Triton, else the torch reference."""
    if HAS_TRITON and logits.is_cuda:
        return gumbel_sample_triton(logits, temperature, is_greedy)
    return gumbel_sample_torch(logits, temperature, is_greedy)
