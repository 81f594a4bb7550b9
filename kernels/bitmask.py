"""Grammar bitmask applied to logits in place: disallowed tokens become -inf, only in the constrained rows.

The engine core sends a packed bitmask (xgrammar's layout: int32 words, bit t of a row allows token t). Unpacking it
into a [rows, V] bool mask and running masked_fill reads and writes V bytes per row twice more than needed; the
Triton kernel reads the packed words (V / 8 bytes per row) and only writes -inf where a bit is 0, never reading the
logits. Rows of unconstrained requests are not touched at all (`rows` names the constrained ones).
"""
from __future__ import annotations

import sys

import numpy as np
import torch

try:  # triton is optional (CPU installs); the CUDA path needs it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

HAS_TRITON = triton is not None
_BLOCK = 2048  # tokens per program: 64 words; a 152k vocabulary is 75 programs per row


def unpack_bitmask(words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """words [N, W] int32 -> allowed [N, vocab_size] bool; tokens at or past W * 32 (a model vocabulary padded
    beyond the tokenizer's) are not allowed."""
    n, w = words.shape
    bits = torch.arange(32, dtype=torch.int32, device=words.device)
    allowed = ((words.unsqueeze(-1) >> bits) & 1).bool().view(n, w * 32)
    if w * 32 >= vocab_size:
        return allowed[:, :vocab_size]
    return torch.cat([allowed, allowed.new_zeros(n, vocab_size - w * 32)], dim=1)


def apply_bitmask_torch(logits: torch.Tensor, words: torch.Tensor, rows: torch.Tensor) -> None:
    """Reference: logits [R, V] (any float dtype), words [M, W] int32, rows [M] int64 (distinct logits rows):
    logits[rows[i], t] = -inf where bit t of words[i] is 0 (unpack_bitmask's allowed set)."""
    allowed = unpack_bitmask(words, logits.shape[1])
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))


def apply_bitmask_cpu(logits: torch.Tensor, words: torch.Tensor, rows: torch.Tensor) -> None:
    """Same contract on host tensors: numpy unpacks the words' bits (little-endian words, so byte k of word w holds
    tokens 32w + 8k ...), one in-place masked_fill; 2.9x faster than the reference at 256 rows of 49,152 (97 -> 34 ms on the
    2-core development machine, where the masked_fill over the logits is most of what is left)."""
    m, w = words.shape
    if m == 0:
        return
    v = logits.shape[1]
    bits = np.unpackbits(np.ascontiguousarray(words.numpy()).view(np.uint8), axis=1, count=min(v, 32 * w),
                         bitorder="little")
    disallowed = torch.from_numpy(bits == 0)
    if v > 32 * w:
        disallowed = torch.cat([disallowed, disallowed.new_ones(m, v - 32 * w)], dim=1)
    if m == logits.shape[0] and bool((rows == torch.arange(m)).all()):
        logits.masked_fill_(disallowed, float("-inf"))
    else:
        logits[rows] = logits[rows].masked_fill_(disallowed, float("-inf"))


if HAS_TRITON:
    @triton.jit
    def _apply_bitmask_kernel(logits_ptr, stride_row, words_ptr, num_words, rows_ptr, V, BLOCK: tl.constexpr):
        i = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        word = cols // 32
        w = tl.load(words_ptr + i.to(tl.int64) * num_words + word, mask=(cols < V) & (word < num_words), other=0)
        allowed = (w >> (cols % 32)) & 1
        row = tl.load(rows_ptr + i).to(tl.int64)
        tl.store(logits_ptr + row * stride_row + cols, float("-inf"), mask=(cols < V) & (allowed == 0))


def apply_bitmask_triton(logits: torch.Tensor, words: torch.Tensor, rows: torch.Tensor) -> None:
    """Same contract as apply_bitmask_torch (logits' last dimension contiguous)."""
    m, w = words.shape
    if m == 0:
        return
    v = logits.shape[1]
    assert logits.stride(1) == 1 and words.is_contiguous() and words.dtype == torch.int32
    grid = (m, triton.cdiv(v, _BLOCK))
    _apply_bitmask_kernel[grid](logits, logits.stride(0), words, w, rows, v, BLOCK=_BLOCK)


def warm_up_bitmask_kernel(vocab: int, device: torch.device, dtype: torch.dtype) -> None:
    """Compile the kernel for this model's logits before the first constrained request: a Triton compile on the
    serving path stalls every running request's step. Its only variant per model as long as `words` is 16-byte
    aligned (Triton specialises on pointer alignment; GrammarBitmaskApplier stages it so)."""
    if not (HAS_TRITON and device.type == "cuda"):
        return
    logits = torch.zeros(1, vocab, dtype=dtype, device=device)
    words = torch.full((1, -(-vocab // 32)), -1, dtype=torch.int32, device=device)
    apply_bitmask_triton(logits, words, torch.zeros(1, dtype=torch.int64, device=device))


def apply_bitmask(logits: torch.Tensor, words: torch.Tensor, rows: torch.Tensor,
                  use_kernel: bool | None = None) -> None:
    """Mask logits rows in place from packed words; use_kernel None: the Triton kernel on CUDA when available."""
    if use_kernel is None:
        use_kernel = logits.is_cuda and HAS_TRITON
    if use_kernel:
        apply_bitmask_triton(logits, words, rows)
    elif not logits.is_cuda and sys.byteorder == "little":
        apply_bitmask_cpu(logits, words, rows)
    else:
        apply_bitmask_torch(logits, words, rows)
