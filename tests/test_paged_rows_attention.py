"""Per-row paged attention (kernels/paged_rows_attention.py): the torch reference against a naive per-row loop, the
Triton kernel against the reference on the CPU through the Triton interpreter (a child process with
TRITON_INTERPRET=1, as in tests/test_kernels.py; skipped with a reason if triton is missing), and on CUDA (gpu
marked): larger shapes in bf16 / fp32 and a captured CUDA graph replayed with new positions.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from vllm_lite.kernels.paged_rows_attention import rows_attention, rows_attention_torch, split_count

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))


def make_case(group: int, d: int, bs: int, *, hkv: int = 2, reqs: int = 3, max_blocks: int = 4, rows: int = 8,
              dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0, max_pos: int | None = None):
    """Random q [rows, hkv * group, d] (a strided view), a cache with spare blocks, a block table of shuffled
    (non-consecutive) block ids, rows of mixed requests; positions cover 0, the last slot of a block and the last
    slot of the table."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = reqs * max_blocks + 5
    cache = torch.randn(num_blocks, 2, bs, hkv, d, generator=g).to(dtype).to(device)
    table = torch.randperm(num_blocks, generator=g)[: reqs * max_blocks].reshape(reqs, max_blocks)
    wide = torch.randn(rows, hkv * group, d + 8, generator=g)
    q = wide.to(dtype).to(device)[:, :, :d]  # unit stride on the last dim only
    row_req = torch.randint(0, reqs, (rows,), generator=g)
    cap = max_blocks * bs if max_pos is None else max_pos + 1
    pos = torch.randint(0, cap, (rows,), generator=g)
    pos[: 3] = torch.tensor([0, bs - 1, max_blocks * bs - 1 if max_pos is None else max_pos])
    return q, cache, table.int().to(device), row_req.to(device), pos.to(device)


def naive(q, cache, table, row_req, pos, scale) -> torch.Tensor:
    """Per row and head: gather the request's first pos + 1 keys / values one by one, softmax in float64."""
    t, hq, d = q.shape
    bs, hkv = cache.shape[2], cache.shape[3]
    out = torch.zeros(t, hq, d, dtype=torch.float64)
    for i in range(t):
        r, n = int(row_req[i]), int(pos[i]) + 1
        slots = [(int(table[r, j // bs]), j % bs) for j in range(n)]
        keys = torch.stack([cache[b, 0, o] for b, o in slots]).double()  # [n, Hkv, D]
        vals = torch.stack([cache[b, 1, o] for b, o in slots]).double()
        for h in range(hq):
            kh = h // (hq // hkv)
            w = torch.softmax(keys[:, kh] @ q[i, h].double() * scale, dim=0)
            out[i, h] = w @ vals[:, kh]
    return out


@pytest.mark.parametrize("group,d,bs", [(1, 64, 16), (3, 16, 4), (4, 64, 4), (4, 16, 16), (3, 64, 16), (1, 16, 4)])
def test_reference_matches_naive(group, d, bs):
    q, cache, table, row_req, pos = make_case(group, d, bs, seed=group * 100 + d + bs)
    scale = 1 / math.sqrt(d)
    got = rows_attention_torch(q, cache, table, row_req, pos, scale)
    assert got.shape == q.shape and got.dtype == q.dtype
    torch.testing.assert_close(got.double(), naive(q, cache, table, row_req, pos, scale), atol=1e-5, rtol=1e-5)


def test_reference_non_consecutive_blocks():
    q, cache, _, _, _ = make_case(2, 16, 4, hkv=1, reqs=2, max_blocks=3, rows=4)
    table = torch.tensor([[9, 2, 10], [0, 7, 5]], dtype=torch.int32)  # of 11 blocks
    row_req = torch.tensor([1, 0, 1, 0], dtype=torch.int32)
    pos = torch.tensor([11, 5, 4, 3])
    got = rows_attention_torch(q, cache, table, row_req, pos, 0.25)
    torch.testing.assert_close(got.double(), naive(q, cache, table, row_req, pos, 0.25), atol=1e-5, rtol=1e-5)
    # the rows read only their own blocks: scrambling every other block changes nothing
    other = torch.ones(cache.shape[0], dtype=torch.bool)
    other[table[row_req.long()].flatten().long()] = False
    scrambled = cache.clone()
    scrambled[other] = torch.randn_like(scrambled[other])
    torch.testing.assert_close(rows_attention_torch(q, scrambled, table, row_req, pos, 0.25), got)


def test_padding_row_returns_zeros_and_dispatch_on_cpu():
    q, cache, table, row_req, pos = make_case(2, 16, 4)
    pos[-1] = -1
    got = rows_attention(q, cache, table, row_req, pos, 0.25)  # CPU: the reference
    torch.testing.assert_close(got, rows_attention_torch(q, cache, table, row_req, pos, 0.25))
    assert torch.isfinite(got).all() and not got[-1].any()


def test_split_count_fills_the_gpu_from_shapes_only():
    assert split_count(1, 3, 8192, 32) == 16  # a batch-1 proposal on the default model: capped at 16
    assert split_count(4, 8, 8192, 32) == 8  # llama-3.1-8b's 8 kv heads, 4 rows: 256 programs
    assert split_count(1, 8, 64, 32) == 2  # never more shares than the table has tiles
    assert split_count(32, 8, 8192, 32) == 1 and split_count(64, 8, 8192, 32) == 1  # enough programs already


_CHILD = textwrap.dedent("""
    import json, math, sys, torch
    sys.path.insert(0, sys.argv[1])
    sys.path.insert(0, sys.argv[2])
    from vllm_lite.kernels.paged_rows_attention import rows_attention_torch, rows_attention_triton
    from test_paged_rows_attention import make_case
    res = {}
    # splits: None = split_count's choice (2 here: 6 rows x 2 kv heads), 1 = one walk per row (no merge), 3 / 16 =
    # key shares of whole tiles merged by the second kernel (16: most shares of the short rows are empty)
    for group, d, bs, dt, bn, sp in [(1, 64, 16, torch.float32, None, 1), (3, 16, 4, torch.float32, 8, None),
                                     (4, 64, 4, torch.float32, 16, 3), (4, 16, 16, torch.float32, 4, 16),
                                     (3, 16, 4, torch.bfloat16, 8, 3), (1, 64, 16, torch.bfloat16, 16, None),
                                     (2, 16, 4, torch.float32, 4, 5)]:
        q, cache, table, row_req, pos = make_case(group, d, bs, rows=6, dtype=dt, seed=group + d + bs)
        pos[-1] = -1  # a padding row: zeros
        row_req = row_req.int() if bn == 8 else row_req
        scale = 1 / math.sqrt(d)
        want = rows_attention_torch(q, cache, table, row_req, pos, scale)
        got = rows_attention_triton(q, cache, table, row_req, pos, scale, block_n=bn, splits=sp)
        tol = 1e-5 if dt == torch.float32 else 2e-2
        res[f"g{group}_d{d}_bs{bs}_{dt}_bn{bn}_sp{sp}"] = (got.shape == want.shape and got.dtype == want.dtype
            and torch.allclose(got.float(), want.float(), atol=tol, rtol=tol)
            ) or f"max err {(got.float() - want.float()).abs().max().item()}"
    print("RESULT" + json.dumps(res))
""")


def test_triton_matches_reference_interpreter():
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.skip("triton is not importable here (pip install triton); the Triton interpreter check needs it")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _CHILD, ROOT, HERE], env=env, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"interpreter run failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    res = json.loads(lines[-1][len("RESULT"):])
    assert len(res) == 7 and all(v is True for v in res.values()), res


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _cuda_case(group: int, d: int, bs: int, dtype: torch.dtype, rows: int = 32):
    return make_case(group, d, bs, hkv=4, reqs=6, max_blocks=2000 // bs + 1, rows=rows, dtype=dtype, device="cuda",
                     max_pos=1999)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("group,d,bs", [(1, 128, 16), (4, 128, 16), (8, 64, 32), (3, 80, 16)])
@pytest.mark.parametrize("rows", [32, 3])  # 3 rows: split keys (16 shares per row and kv head)
def test_triton_matches_reference_cuda(dtype, group, d, bs, rows):
    q, cache, table, row_req, pos = _cuda_case(group, d, bs, dtype, rows)
    scale = 1 / math.sqrt(d)
    want = rows_attention_torch(q, cache, table, row_req, pos, scale)
    got = rows_attention(q, cache, table, row_req, pos, scale)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.gpu
@needs_cuda
def test_triton_in_cuda_graph_reads_positions_on_replay():
    q, cache, table, row_req, pos = _cuda_case(4, 128, 16, torch.bfloat16)
    pos.fill_(7)  # captured with short rows: the replay must not keep the captured lengths
    scale = 1 / math.sqrt(128)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        rows_attention(q, cache, table, row_req, pos, scale)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = rows_attention(q, cache, table, row_req, pos, scale)
    g = torch.Generator().manual_seed(1)
    for new in (torch.randint(0, 2000, (32,), generator=g), torch.arange(32) * 61):
        pos.copy_(new)
        q.copy_(torch.randn(q.shape, generator=g))
        graph.replay()
        want = rows_attention_torch(q, cache, table, row_req, pos, scale)
        torch.testing.assert_close(out.float(), want.float(), atol=2e-2, rtol=2e-2)
