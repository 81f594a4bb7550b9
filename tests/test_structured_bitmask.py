"""Applying the grammar bitmask on the worker: the Triton kernel (kernels/bitmask.py) against its torch reference
under the Triton CPU interpreter, the runner-side mapping of GrammarOutput rows onto logits rows
(sample/bitmask.py), and on CUDA (marked gpu) the kernel and the pinned-buffer path against the CPU reference."""
from __future__ import annotations

import itertools
import random
import textwrap

import numpy as np
import pytest
import torch

from vllm_lite.kernels.bitmask import apply_bitmask_cpu, apply_bitmask_torch, unpack_bitmask
from vllm_lite.protocol import GrammarOutput
from vllm_lite.sample.bitmask import GrammarBitmaskApplier, pack_bitmask

from test_kernels import _run_child

_CHILD = textwrap.dedent(r"""
    import json, sys, torch
    sys.path.insert(0, sys.argv[1])
    from vllm_lite.kernels.bitmask import apply_bitmask_torch, apply_bitmask_triton
    g = torch.Generator().manual_seed(0)
    res = {}
    # (rows of logits, vocab, words per row, constrained rows): a partial last block, a vocabulary padded past the
    # tokenizer's (W * 32 > V), and one wider than the words (tokens past W * 32 are disallowed).
    for r, v, w, rows in [(5, 2053, 65, [0, 3, 4]), (3, 4096, 128, [2]), (4, 100, 3, [1, 0, 3, 2])]:
        for dt in (torch.float32, torch.bfloat16):
            logits = torch.randn(r, v, generator=g).to(dt)
            words = torch.randint(-2**31, 2**31 - 1, (len(rows), w), generator=g, dtype=torch.int64).to(torch.int32)
            idx = torch.tensor(rows, dtype=torch.int64)
            want, got = logits.clone(), logits.clone()
            apply_bitmask_torch(want, words, idx)
            apply_bitmask_triton(got, words, idx)
            res[f"{r}x{v}x{w}_{dt}"] = bool(torch.equal(want, got))
    print("RESULT" + json.dumps(res))
""")


def test_triton_kernel_matches_reference():
    got = _run_child(_CHILD)
    assert len(got) == 6 and all(v is True for v in got.values()), got


@pytest.mark.parametrize("vocab,rows", [(70, [4, 0, 2]), (100, [0, 1, 2]), (64, [1, 2, 0]), (33, [0, 1, 2])])
def test_cpu_path_matches_reference(vocab, rows):
    g = torch.Generator().manual_seed(vocab)
    allowed = torch.rand(3, min(vocab, 64), generator=g) < 0.4
    words = pack_bitmask(allowed)
    logits = torch.randn(5 if max(rows) > 2 else 3, vocab, generator=g)
    want, got = logits.clone(), logits.clone()
    idx = torch.tensor(rows)
    apply_bitmask_torch(want, words, idx)
    apply_bitmask_cpu(got, words, idx)
    assert torch.equal(got, want)


def test_reference_masks_exactly_the_cleared_bits():
    g = torch.Generator().manual_seed(1)
    allowed = torch.rand(3, 70, generator=g) < 0.3
    words = pack_bitmask(allowed)
    assert torch.equal(unpack_bitmask(words, 70), allowed)
    logits = torch.randn(5, 70, generator=g)
    out = logits.clone()
    apply_bitmask_torch(out, words, torch.tensor([4, 0, 2]))
    for i, row in enumerate([4, 0, 2]):
        assert torch.equal(out[row][allowed[i]], logits[row][allowed[i]])
        assert bool(torch.isneginf(out[row][~allowed[i]]).all())
    assert torch.equal(out[[1, 3]], logits[[1, 3]])  # rows without grammar rows: untouched
    wide = torch.randn(1, 100)  # vocabulary wider than the words: the tail is not allowed
    apply_bitmask_torch(wide, pack_bitmask(torch.ones(1, 64, dtype=torch.bool)), torch.tensor([0]))
    assert bool(torch.isneginf(wide[0, 64:]).all()) and bool(torch.isfinite(wide[0, :64]).all())


def _grammar(req_ids: list[str], rows_per_req: list[int], allowed: torch.Tensor) -> GrammarOutput:
    words = pack_bitmask(allowed)
    return GrammarOutput(req_ids, rows_per_req, words.shape[1], words.numpy().tobytes())


def _expected(logits: torch.Tensor, allowed: torch.Tensor, dst: list[int], src: list[int]) -> torch.Tensor:
    want = logits.clone()
    for d, s in zip(dst, src):
        want[d][~allowed[s]] = float("-inf")
    return want


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_applier_maps_grammar_rows_onto_sampling_rows(device):
    """Grammar rows in the engine core's order (a request verifying 2 drafts has 3 rows, one that is not sampling
    this step has rows that are skipped); logits rows in the step's order; other rows untouched."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    g = torch.Generator().manual_seed(2)
    v = 300
    allowed = torch.rand(6, v, generator=g) < 0.5
    # logits rows: "a" (1 row), "b" (3 rows: 2 drafts), "c" (1 row, unconstrained), "d" (1 row)
    req_ids, offsets = ["a", "b", "c", "d"], [0, 1, 4, 5, 6]
    grammar = _grammar(["d", "gone", "b", "a"], [1, 1, 3, 1], allowed)
    logits = torch.randn(6, v, generator=g)
    applier = GrammarBitmaskApplier(torch.device(device))
    for _ in range(3):  # the CUDA path alternates two pinned buffers
        got = logits.to(device)
        applier.apply(got, grammar, req_ids, offsets)
        want = _expected(logits, allowed, dst=[5, 1, 2, 3, 0], src=[0, 2, 3, 4, 5])
        assert torch.equal(got.cpu(), want)


def test_applier_random_layouts_match_a_per_request_walk():
    """Random steps: requests with 0..3 drafts, constrained ones in any order, some not in the step, some with more
    grammar rows than logits rows (their drafts were cut): row i of a request's grammar rows masks its logits row i,
    for as many rows as both have."""
    rng = random.Random(5)
    g = torch.Generator().manual_seed(5)
    v = 70
    for _ in range(200):
        req_ids = [f"r{i}" for i in range(rng.randrange(1, 9))]
        counts = [1 + rng.randrange(4) for _ in req_ids]
        offsets = [0] + list(itertools.accumulate(counts))
        constrained = [r for r in req_ids if rng.random() < 0.6] + (["gone"] if rng.random() < 0.3 else [])
        rng.shuffle(constrained)
        rows = [1 + rng.randrange(4) for _ in constrained]
        if not rows:
            continue
        allowed = torch.rand(sum(rows), v, generator=g) < 0.5
        dst, src, row = [], [], 0
        for r, n in zip(constrained, rows):
            if r in req_ids:
                j = req_ids.index(r)
                k = min(n, counts[j])
                dst += range(offsets[j], offsets[j] + k)
                src += range(row, row + k)
            row += n
        logits = torch.randn(offsets[-1], v, generator=g)
        got = logits.clone()
        GrammarBitmaskApplier(torch.device("cpu")).apply(got, _grammar(constrained, rows, allowed), req_ids,
                                                          offsets)
        assert torch.equal(got, _expected(logits, allowed, dst, src))


@pytest.mark.gpu
def test_cuda_kernel_large_batch_matches_reference():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from vllm_lite.kernels.bitmask import apply_bitmask
    g = torch.Generator().manual_seed(3)
    for dt in (torch.float32, torch.bfloat16):
        logits = torch.randn(512, 151936, generator=g).to(dt)
        rows = torch.from_numpy(np.random.default_rng(0).choice(512, 300, replace=False))
        words = torch.randint(-2**31, 2**31 - 1, (300, 4748), generator=g, dtype=torch.int64).to(torch.int32)
        want = logits.clone()
        apply_bitmask_torch(want, words, rows)
        got = logits.cuda()
        apply_bitmask(got, words.cuda(), rows.cuda())
        assert torch.equal(got.cpu(), want)


def test_packed_segments_start_aligned():
    """kernels/alignment.py, used by every packer of kernel inputs (the bitmask staging copy, the rejection
    sampler's vectors, the input stager): each segment starts on the boundary for any counts before it, and none
    overlaps the next (an odd count once started the bitmask words 8 bytes off, compiling a second kernel variant
    on the serving path)."""
    from vllm_lite.kernels.alignment import packed_starts
    for itemsize, align in ((4, 16), (8, 16), (4, 64)):
        for sizes in ([1], [2, 1536], [3, 3, 3], [7, 0, 5, 1], [16, 1, 33]):
            starts = packed_starts(sizes, itemsize, align)
            assert starts[0] == 0 and len(starts) == len(sizes) + 1
            assert all(st * itemsize % align == 0 for st in starts)
            assert all(starts[i] + n <= starts[i + 1] < starts[i] + n + align for i, n in enumerate(sizes))


def test_applier_in_order_fast_path_and_its_near_misses():
    """Every sampling row constrained, one row each, in order (batch 1, grammars without drafts) skips the index
    work; the same masks in another order, with a verification row, or with an unconstrained request go the general
    way. All equal the per-row walk."""
    g = torch.Generator().manual_seed(7)
    v = 70
    for m in (1, 2, 5):
        ids = [f"r{i}" for i in range(m)]
        allowed = torch.rand(m, v, generator=g) < 0.5
        logits = torch.randn(m, v, generator=g)
        got = logits.clone()
        GrammarBitmaskApplier(torch.device("cpu")).apply(got, _grammar(ids, [1] * m, allowed), ids, list(range(m + 1)))
        assert torch.equal(got, _expected(logits, allowed, list(range(m)), list(range(m))))
        rev = ids[::-1]  # same requests, grammar rows in reverse order
        got = logits.clone()
        GrammarBitmaskApplier(torch.device("cpu")).apply(got, _grammar(rev, [1] * m, allowed), ids, list(range(m + 1)))
        assert torch.equal(got, _expected(logits, allowed, list(range(m)), list(range(m))[::-1]))
        wide = torch.randn(m + 1, v, generator=g)  # the last request verifies one draft: two logits rows
        got = wide.clone()
        GrammarBitmaskApplier(torch.device("cpu")).apply(got, _grammar(ids, [1] * m, allowed), ids,
                                                          list(range(m)) + [m + 1])
        assert torch.equal(got, _expected(wide, allowed, list(range(m)), list(range(m))))
