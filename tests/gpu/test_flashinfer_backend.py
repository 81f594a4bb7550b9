"""FlashInfer backend vs the torch reference backend on the same paged cache (bf16, block 16, GQA, D 64/128).

Batches: pure prefill, chunked prefill over cached prefixes, prefix hits (prefix on a block boundary), pure
decode, mixed; padded token rows (eager); CUDA-graph decode captured at a padded batch size and replayed with
different real batches. fp16 cases are marked slow: their kernels are not in the prebuilt JIT cache (minutes).
"""
from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("flashinfer")

from vllm_lite.attention import AttentionSpec, StepMetadata, TorchAttentionBackend  # noqa: E402
from vllm_lite.attention.flashinfer_backend import FlashInferBackend  # noqa: E402
from vllm_lite.attention.torch_backend import write_kv_cache as torch_write  # noqa: E402

DEVICE = "cuda"
BLOCK = 16
NUM_BLOCKS = 512
MAX_SEQS = 32
MAX_BLOCKS = 64
ATOL = RTOL = 2e-2

CASES = {
    "prefill": [(0, 37), (0, 5), (0, 128), (0, 1)],
    "chunked": [(48, 20), (100, 33), (7, 64), (250, 17)],
    "prefix_hit": [(32, 9), (64, 30), (16, 1), (128, 100)],
    "decode": [(p, 1) for p in (0, 1, 15, 16, 17, 31, 100, 255, 511, 64, 3, 47)],
    "mixed": [(0, 7), (5, 6), (12, 1), (3, 1), (0, 1), (9, 4), (200, 1), (70, 50), (16, 16)],
    "verify": [(p, 4) for p in (1, 12, 13, 15, 16, 60, 255, 3)],  # 1 + 3 speculative tokens per request
}
SHAPES = [(16, 8, 64), (16, 8, 128), (32, 8, 64), (32, 8, 128), (9, 3, 64)]  # last: SmolLM2-135M
DTYPES = [torch.bfloat16, pytest.param(torch.float16, marks=pytest.mark.slow)]


def _spec(hq: int, hkv: int, d: int) -> AttentionSpec:
    return AttentionSpec(hq, hkv, d, 1 / math.sqrt(d))


def _backend(spec: AttentionSpec, dtype: torch.dtype, tensor_cores: bool | None = None) -> FlashInferBackend:
    return FlashInferBackend(spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.scale, dtype, DEVICE,
                             MAX_SEQS, MAX_BLOCKS, use_tensor_cores=tensor_cores)


def build_batch(reqs: list[tuple[int, int]], spec: AttentionSpec, cache: torch.Tensor, gen: torch.Generator,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, StepMetadata]:
    """reqs: (cached prefix, new tokens). Random blocks; the prefix is written into `cache` with the torch write."""
    hq, hkv, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    perm = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
    tables, slots, qs, ks, vs = [], [], [], [], []
    for prefix, new in reqs:
        total = prefix + new
        blocks = [perm.pop() for _ in range(-(-total // BLOCK))]
        tables.append(blocks)
        pos = torch.arange(total)
        pos_slots = (torch.tensor(blocks)[pos // BLOCK] * BLOCK + pos % BLOCK).to(DEVICE)
        k = torch.randn(total, hkv, d, generator=gen).to(DEVICE, dtype)
        v = torch.randn(total, hkv, d, generator=gen).to(DEVICE, dtype)
        torch_write(k[:prefix], v[:prefix], cache, pos_slots[:prefix], BLOCK)
        slots.append(pos_slots[prefix:])
        qs.append(torch.randn(new, hq, d, generator=gen).to(DEVICE, dtype))
        ks.append(k[prefix:])
        vs.append(v[prefix:])
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    qlens = torch.tensor([n for _, n in reqs])
    qsl = torch.zeros(len(reqs) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(qlens, 0)
    seq_lens = torch.tensor([p + n for p, n in reqs], dtype=torch.int32)
    meta = StepMetadata(len(reqs), int(qsl[-1]), qsl.to(DEVICE), seq_lens.to(DEVICE), bt.to(DEVICE),
                        torch.cat(slots).long(), qsl, seq_lens, int(qlens.max()), int(seq_lens.max()), BLOCK)
    return torch.cat(qs), torch.cat(ks), torch.cat(vs), meta


def _new_cache(spec: AttentionSpec, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    shape = TorchAttentionBackend().kv_cache_shape(NUM_BLOCKS, BLOCK, spec.num_kv_heads, spec.head_dim)
    return torch.randn(shape, generator=gen).to(DEVICE, dtype)  # garbage everywhere not written


def _torch_ref(q, k, v, cache, spec, meta):
    ref_cache = cache.clone()
    torch_backend = TorchAttentionBackend()
    out = torch_backend.forward(q, k, v, ref_cache, spec, torch_backend.prepare(meta))
    return out, ref_cache


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"hq{s[0]}-hkv{s[1]}-d{s[2]}")
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("tc", [True, False], ids=["tensor-core", "cuda-core"])
def test_matches_torch_backend(case, shape, dtype, tc):
    spec = _spec(*shape)
    gen = torch.Generator().manual_seed(list(CASES).index(case))
    backend = _backend(spec, dtype, tc)
    cache = _new_cache(spec, dtype, gen)
    q, k, v, meta = build_batch(CASES[case], spec, cache, gen, dtype)
    ref, ref_cache = _torch_ref(q, k, v, cache, spec, meta)
    out = backend.forward(q, k, v, cache, spec, backend.prepare(meta))
    torch.cuda.synchronize()
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    assert torch.equal(cache, ref_cache)  # same K/V written to the same slots, nothing else touched


@pytest.mark.parametrize("case", ["prefill", "mixed", "decode"])
def test_strided_views_of_fused_qkv(case):
    """The models pass q/k/v as column slices of one fused qkv projection (row stride > heads * head_dim)."""
    spec = _spec(9, 3, 64)
    gen = torch.Generator().manual_seed(7)
    backend = _backend(spec, torch.bfloat16)
    cache = _new_cache(spec, torch.bfloat16, gen)
    q, k, v, meta = build_batch(CASES[case], spec, cache, gen, torch.bfloat16)
    t = q.shape[0]
    qkv = torch.cat([q.reshape(t, -1), k.reshape(t, -1), v.reshape(t, -1)], dim=1)
    qv, kv_, vv = qkv.split([9 * 64, 3 * 64, 3 * 64], dim=1)
    ref, ref_cache = _torch_ref(q, k, v, cache, spec, meta)
    out = backend.forward(qv.view(t, 9, 64), kv_.view(t, 3, 64), vv.view(t, 3, 64), cache, spec,
                          backend.prepare(meta))
    torch.cuda.synchronize()
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    assert torch.equal(cache, ref_cache)


def test_steps_replan_and_padded_rows():
    """Several steps through one backend (wrappers re-planned), with padded token rows past num_tokens."""
    spec = _spec(16, 8, 128)
    gen = torch.Generator().manual_seed(1)
    backend = _backend(spec, torch.bfloat16)
    for case in ("mixed", "decode", "chunked", "decode"):
        cache = _new_cache(spec, torch.bfloat16, gen)
        q, k, v, meta = build_batch(CASES[case], spec, cache, gen, torch.bfloat16)
        ref, ref_cache = _torch_ref(q, k, v, cache, spec, meta)
        pad = 5
        qp = torch.cat([q, torch.randn(pad, *q.shape[1:], device=DEVICE, dtype=q.dtype)])
        kp = torch.cat([k, torch.randn(pad, *k.shape[1:], device=DEVICE, dtype=k.dtype)])
        vp = torch.cat([v, torch.randn(pad, *v.shape[1:], device=DEVICE, dtype=v.dtype)])
        out = backend.forward(qp, kp, vp, cache, spec, backend.prepare(meta))
        assert out.shape == qp.shape
        torch.testing.assert_close(out[: meta.num_tokens], ref, atol=ATOL, rtol=RTOL)
        assert torch.equal(cache, ref_cache)


def _capture(fn):
    """Warm up on a side stream, capture fn into a CUDA graph, return graph.replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


@pytest.mark.parametrize("shape", [(16, 8, 64), (32, 8, 128)], ids=lambda s: f"hq{s[0]}-hkv{s[1]}-d{s[2]}")
@pytest.mark.parametrize("tc", [True, False], ids=["tensor-core", "cuda-core"])
def test_cuda_graph_decode(shape, tc):
    """Capture at padded batch size G with an all-padding dummy step; replay with real batches of <= G requests."""
    spec = _spec(*shape)
    dtype = torch.bfloat16
    hq, hkv, d = shape
    G = 8
    gen = torch.Generator().manual_seed(2)
    backend = _backend(spec, dtype, tc)
    cache = _new_cache(spec, dtype, gen)
    q_buf = torch.zeros(G, hq, d, device=DEVICE, dtype=dtype)
    k_buf = torch.zeros(G, hkv, d, device=DEVICE, dtype=dtype)
    v_buf = torch.zeros(G, hkv, d, device=DEVICE, dtype=dtype)
    slot_buf = torch.full((G,), -1, dtype=torch.int64, device=DEVICE)
    out_buf = torch.zeros(G, hq, d, device=DEVICE, dtype=dtype)
    ones = torch.ones(G, dtype=torch.int32)
    qsl = torch.arange(G + 1, dtype=torch.int32)
    dummy = StepMetadata(G, G, qsl.to(DEVICE), ones.to(DEVICE), torch.zeros(G, 1, dtype=torch.int32, device=DEVICE),
                         slot_buf, qsl, ones, 1, 1, BLOCK)
    before = cache.clone()
    captured_meta = backend.prepare(dummy, graph_batch_size=G)

    def step() -> None:
        out_buf.copy_(backend.forward(q_buf, k_buf, v_buf, cache, spec, captured_meta))

    replay = _capture(step)
    torch.cuda.synchronize()
    assert torch.equal(cache, before)  # the all-padding warm-up wrote nothing

    # The second batch has the first one's page counts (the plan is reused; indices and last pages change).
    for reqs in ([(40, 1), (3, 1), (0, 1)], [(41, 1), (4, 1), (1, 1)],
                 [(p, 1) for p in (511, 16, 17, 100, 1, 250, 31, 64)],
                 [(15, 1)], [(300, 1), (47, 1), (2, 1), (129, 1), (64, 1)]):
        n = len(reqs)
        q, k, v, meta = build_batch(reqs, spec, cache, gen, dtype)
        ref, ref_cache = _torch_ref(q, k, v, cache, spec, meta)
        q_buf.normal_()
        k_buf.normal_()
        v_buf.normal_()  # padding rows carry garbage
        q_buf[:n], k_buf[:n], v_buf[:n] = q, k, v
        slot_buf.fill_(-1)
        slot_buf[:n] = meta.slot_mapping
        backend.prepare(meta, graph_batch_size=G)
        replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out_buf[:n], ref, atol=ATOL, rtol=RTOL)
        assert torch.equal(cache, ref_cache)  # padding rows (slot -1) did not touch the cache


def test_selector():
    from vllm_lite.attention.selector import make_backend

    spec = _spec(16, 8, 64)
    kw = dict(num_heads=16, num_kv_heads=8, head_dim=64, scale=spec.scale, dtype=torch.bfloat16,
              max_num_seqs=4, max_blocks_per_seq=8)
    assert make_backend("auto", device=torch.device("cuda"), **kw).name == "flashinfer"
    assert make_backend("torch", device=torch.device("cuda"), **kw).name == "torch"
    assert make_backend("auto", device=torch.device("cpu"), **kw).name == "torch"
    with pytest.raises(ValueError, match="CUDA"):
        make_backend("flashinfer", device=torch.device("cpu"), **kw)


@pytest.mark.parametrize("q_len", [2, 4])
def test_cuda_graph_verify(q_len):
    """Uniform steps of q_len tokens per request (1 + k speculative) replayed from a graph captured for G requests
    of dummy q_len-token requests; real batches of <= G requests, padding requests attend to block 0."""
    spec = _spec(16, 8, 64)
    dtype = torch.bfloat16
    hq, hkv, d = 16, 8, 64
    G = 8
    T = G * q_len
    gen = torch.Generator().manual_seed(3)
    backend = _backend(spec, dtype)
    cache = _new_cache(spec, dtype, gen)
    q_buf = torch.zeros(T, hq, d, device=DEVICE, dtype=dtype)
    k_buf = torch.zeros(T, hkv, d, device=DEVICE, dtype=dtype)
    v_buf = torch.zeros(T, hkv, d, device=DEVICE, dtype=dtype)
    slot_buf = torch.full((T,), -1, dtype=torch.int64, device=DEVICE)
    out_buf = torch.zeros(T, hq, d, device=DEVICE, dtype=dtype)
    lens = torch.full((G,), q_len, dtype=torch.int32)
    qsl = torch.arange(0, T + 1, q_len, dtype=torch.int32)
    dummy = StepMetadata(G, T, qsl.to(DEVICE), lens.to(DEVICE), torch.zeros(G, 1, dtype=torch.int32, device=DEVICE),
                         slot_buf, qsl, lens, q_len, q_len, BLOCK)
    before = cache.clone()
    captured_meta = backend.prepare(dummy, graph_batch_size=T)

    def step() -> None:
        out_buf.copy_(backend.forward(q_buf, k_buf, v_buf, cache, spec, captured_meta))

    replay = _capture(step)
    torch.cuda.synchronize()
    assert torch.equal(cache, before)
    for reqs in ([(40, q_len), (3, q_len), (0, q_len)], [(p, q_len) for p in (511 - q_len, 16, 17, 100, 1, 250, 31, 64)],
                 [(15, q_len)], [(300, q_len), (47, q_len), (2, q_len), (129, q_len), (64, q_len)]):
        q, k, v, meta = build_batch(reqs, spec, cache, gen, dtype)
        n = meta.num_tokens
        ref, ref_cache = _torch_ref(q, k, v, cache, spec, meta)
        q_buf.normal_()
        k_buf.normal_()
        v_buf.normal_()
        q_buf[:n], k_buf[:n], v_buf[:n] = q, k, v
        slot_buf.fill_(-1)
        slot_buf[:n] = meta.slot_mapping
        backend.prepare(meta, graph_batch_size=T)
        replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out_buf[:n], ref, atol=ATOL, rtol=RTOL)
        assert torch.equal(cache, ref_cache)
