"""kernels/argmax.py: numpy's row argmax on host float32 tensors picks what torch's does (first maximum, first NaN),
under inference mode too; other dtypes and devices go through torch."""
from __future__ import annotations

import torch

from vllm_lite.kernels.argmax import row_argmax


def test_matches_torch_including_ties_infinities_and_nan():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1000, generator=g)
    x[3, [10, 500]] = 100.0  # a tie: the first one
    x[4] = float("-inf")  # all masked: index 0, as torch
    x[5, 7] = float("-inf")
    x[6, [20, 30]] = float("nan")  # the first NaN, as torch
    x[7, :] = 2.5
    with torch.inference_mode():
        got = row_argmax(x)
    assert got.dtype == torch.int64 and torch.equal(got, x.argmax(dim=-1))
    assert got[3] == 10 and got[4] == 0 and got[6] == 20 and got[7] == 0
    strided = x[:, ::3]  # a non-contiguous view
    assert torch.equal(row_argmax(strided), strided.argmax(dim=-1))


def test_other_dtypes_use_torch():
    x = torch.randn(4, 50).to(torch.bfloat16)
    assert torch.equal(row_argmax(x), x.argmax(dim=-1))
