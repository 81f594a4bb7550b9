"""Random sampling from temperature-scaled logits by inverse CDF, in one read of the logits.

The Sampler's torch path draws by an exponential race (argmax(softmax(x / T) / q), q ~ Exp(1)): six float32 passes
over [B, V] (~0.9 ms per step at batch 256 with a 152k vocabulary on an H100). A race needs one random number per
token, and drawing 39M Philox numbers per step made a fused race kernel compute-bound (~145 us at batch 256). Inverse
CDF needs one random number per row and one exp per token:

1. `_chunk_stats_kernel`, programs = rows x chunks: per chunk of the vocabulary the max of x / T, the sum of
   exp(x / T - max) and the first argmax. This is the only full read of the logits (in their own dtype).
2. `_pick_kernel`, one program per row: combines the chunk sums into the row's total, draws u ~ U[0, 1) (Philox from
   a seed taken off torch's CPU generator, so `torch.manual_seed` makes runs reproducible), finds the chunk whose
   cumulative mass passes u * total, and scans only that chunk (a cumulative sum of exp(x / T - max)) for the token.
   Greedy rows (temperature 0 in a mixed batch) take the first argmax over the chunks' first argmaxes instead.

`u` may be passed instead of drawn: the result then equals the float64 torch reference `cdf_sample_torch` on the same
u, up to float32 rounding at the boundary between two tokens (the correctness tests check exactly that).
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
_CHUNK = 4096  # a 152k vocabulary is 38 chunks per row: enough programs at batch 1, small stats at batch 256


def cdf_sample_torch(logits: torch.Tensor, temperature: torch.Tensor, is_greedy: torch.Tensor,
                     u: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: [B, V] logits, [B] temperature (1.0 on greedy rows), [B] bool greedy rows, optional [B] uniforms
    -> [B] int64 ids: the first token whose cumulative probability exceeds u (float64 sums)."""
    x = (logits.float() / temperature.unsqueeze(1)).double()
    if u is None:
        u = torch.rand(x.shape[0], device=x.device)
    w = torch.exp(x - x.max(dim=-1, keepdim=True).values)
    cdf = w.cumsum(dim=-1)
    target = (u.double() * cdf[:, -1]).unsqueeze(1)
    ids = torch.searchsorted(cdf, target, right=True).view(-1).clamp_(max=x.shape[1] - 1)
    return torch.where(is_greedy, x.argmax(dim=-1), ids)


if HAS_TRITON:
    @triton.jit
    def _chunk_stats_kernel(logits_ptr, stride_row, temp_ptr, V, max_ptr, sum_ptr, arg_ptr, num_chunks,
                            CHUNK: tl.constexpr):
        row = tl.program_id(0)
        c = tl.program_id(1)
        cols = c * CHUNK + tl.arange(0, CHUNK)
        mask = cols < V
        t = tl.load(temp_ptr + row)
        x = tl.load(logits_ptr + row.to(tl.int64) * stride_row + cols, mask=mask, other=float("-inf"))
        x = x.to(tl.float32) / t
        m = tl.max(x, axis=0)
        safe_m = tl.where(m == float("-inf"), 0.0, m)  # an all -inf chunk has zero mass, not NaN
        s = tl.sum(tl.exp(x - safe_m), axis=0)
        arg = tl.min(tl.where(x == m, cols, 2147483647), axis=0)
        out = row * num_chunks + c
        tl.store(max_ptr + out, m)
        tl.store(sum_ptr + out, s)
        tl.store(arg_ptr + out, arg)

    # A fresh random seed each step: specialised (== 1, divisible by 16) it would compile new variants at random
    # moments on the serving path.
    @triton.jit(do_not_specialize=["seed"])
    def _pick_kernel(logits_ptr, stride_row, temp_ptr, greedy_ptr, u_ptr, seed, V, max_ptr, sum_ptr, arg_ptr,
                     out_ptr, num_chunks, HAS_U: tl.constexpr, CHUNK: tl.constexpr, NUM_CHUNKS_P2: tl.constexpr):
        row = tl.program_id(0)
        cs = tl.arange(0, NUM_CHUNKS_P2)
        cmask = cs < num_chunks
        m_c = tl.load(max_ptr + row * num_chunks + cs, mask=cmask, other=float("-inf"))
        m = tl.max(m_c, axis=0)
        s_c = tl.load(sum_ptr + row * num_chunks + cs, mask=cmask, other=0.0)
        w = tl.where(m_c == float("-inf"), 0.0, s_c * tl.exp(m_c - m))
        cw = tl.cumsum(w, axis=0)
        if HAS_U:
            u = tl.load(u_ptr + row)
        else:
            u = tl.rand(seed, row)
        target = u * tl.sum(w, axis=0)
        # The chunk holding the target: the number of chunks whose cumulative mass is <= it, never past the last
        # chunk with mass (float rounding can put the target at or past the total).
        last = tl.max(tl.where(w > 0, cs, 0), axis=0)
        c = tl.minimum(tl.sum((cw <= target).to(tl.int32), axis=0), last)
        rest = target - tl.sum(tl.where(cs == c, cw - w, 0.0), axis=0)
        cols = c * CHUNK + tl.arange(0, CHUNK)
        mask = cols < V
        t = tl.load(temp_ptr + row)
        x = tl.load(logits_ptr + row.to(tl.int64) * stride_row + cols, mask=mask, other=float("-inf"))
        e = tl.where(mask, tl.exp(x.to(tl.float32) / t - m), 0.0)
        ce = tl.cumsum(e, axis=0)
        j = tl.sum((ce <= rest).to(tl.int32), axis=0)
        last_j = tl.max(tl.where(e > 0, tl.arange(0, CHUNK), 0), axis=0)
        sampled = c * CHUNK + tl.minimum(j, last_j)
        first = tl.min(tl.where(m_c == m, cs, NUM_CHUNKS_P2), axis=0)  # greedy rows: the first chunk holding the max
        greedy = tl.load(arg_ptr + row * num_chunks + first)
        tl.store(out_ptr + row, tl.where(tl.load(greedy_ptr + row) != 0, greedy, sampled).to(tl.int64))


def cdf_sample_triton(logits: torch.Tensor, temperature: torch.Tensor, is_greedy: torch.Tensor,
                      u: torch.Tensor | None = None, seed: int | None = None, chunk: int = _CHUNK,
                      num_warps: int = 8) -> torch.Tensor:
    """Same contract as `cdf_sample_torch`; logits may be bf16/fp16/fp32 with unit stride along the vocabulary.
    chunk / num_warps: tiling (the default suits a 150k vocabulary; the interpreter tests use small chunks)."""
    b, v = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    num_chunks = triton.cdiv(v, chunk)
    maxes = torch.empty(b, num_chunks, dtype=torch.float32, device=logits.device)
    sums = torch.empty_like(maxes)
    args = torch.empty(b, num_chunks, dtype=torch.int32, device=logits.device)
    out = torch.empty(b, dtype=torch.int64, device=logits.device)
    if u is None and seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())  # torch's CPU generator: no device sync
    _chunk_stats_kernel[(b, num_chunks)](logits, logits.stride(0), temperature, v, maxes, sums, args, num_chunks,
                                         CHUNK=chunk, num_warps=num_warps)
    _pick_kernel[(b,)](logits, logits.stride(0), temperature, is_greedy, u if u is not None else maxes, seed or 0, v,
                       maxes, sums, args, out, num_chunks, HAS_U=u is not None, CHUNK=chunk,
                       NUM_CHUNKS_P2=triton.next_power_of_2(num_chunks), num_warps=num_warps)
    return out


def warm_up_cdf_sample(vocab: int, device: torch.device, dtype: torch.dtype) -> None:
    """Compile both kernels for this model's logits before the first random-sampling request (a compile on the
    serving path stalls every running request's step)."""
    if not (HAS_TRITON and device.type == "cuda"):
        return
    logits = torch.zeros(1, vocab, dtype=dtype, device=device)
    cdf_sample_triton(logits, torch.ones(1, device=device), torch.zeros(1, dtype=torch.bool, device=device))
