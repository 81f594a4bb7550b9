"""Triton kernels on the GPU vs their torch references: KV-cache write (exact, eager and under a CUDA graph), the
sort-free top-k/top-p/min-p mask (same allowed set as the reference, see tests/test_kernels.py:check_mask), the
q/k norm + rotary kernel, inverse-CDF sampling and the decode-sized GEMM."""
from __future__ import annotations

import itertools

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("triton")

from test_kernels import check_mask  # noqa: E402  (tests/ is on sys.path via tests/conftest.py)

from vllm_lite.kernels.kv_cache import write_kv_cache, write_kv_cache_torch  # noqa: E402
from vllm_lite.kernels.sampling import top_k_top_p_min_p_triton  # noqa: E402

DEV = "cuda"


@pytest.mark.parametrize("kdt,cdt", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                     (torch.float32, torch.float32), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("t,h,d", [(1, 8, 128), (17, 8, 128), (256, 8, 128), (64, 2, 64), (5, 4, 80)])
def test_kv_write_exact(kdt, cdt, t, h, d):
    g = torch.Generator(device=DEV).manual_seed(t * 131 + h + d)
    bs, nb = 16, 64
    qkv = torch.randn(t, 4 * h * d, device=DEV, generator=g).to(kdt)
    k, v = qkv[:, 2 * h * d:3 * h * d].view(t, h, d), qkv[:, 3 * h * d:].view(t, h, d)
    slots = torch.randperm(nb * bs, device=DEV, generator=g)[:t]
    if t > 1:
        slots[1::4] = -1
    cache = torch.randn(nb, 2, bs, h, d, device=DEV, generator=g).to(cdt)
    ref = cache.clone()
    valid = slots >= 0
    write_kv_cache_torch(k[valid], v[valid], ref, slots[valid], bs)
    write_kv_cache(k, v, cache, slots, bs)
    assert torch.equal(cache, ref)


def test_kv_write_kernel_switch(monkeypatch):
    """use_kernel=False (KernelConfig.kv_write_kernel off) writes with the torch reference, never the kernel."""
    import vllm_lite.kernels.kv_cache as kv
    k, v = torch.randn(3, 2, 64, device=DEV), torch.randn(3, 2, 64, device=DEV)
    slots = torch.tensor([0, 5, 17], device=DEV)
    cache, ref = torch.zeros(4, 2, 16, 2, 64, device=DEV), torch.zeros(4, 2, 16, 2, 64, device=DEV)
    calls = []
    real = kv.write_kv_cache_triton
    monkeypatch.setattr(kv, "write_kv_cache_triton", lambda *a: calls.append(1) or real(*a))
    kv.write_kv_cache(k, v, cache, slots, 16, use_kernel=False)
    assert not calls
    kv.write_kv_cache(k, v, ref, slots, 16)
    assert calls and torch.equal(cache, ref)


def test_kv_write_cuda_graph():
    """Captured once with padding rows, replayed with new k/v/slots: same as the reference each time."""
    t, h, d, bs, nb = 8, 8, 128, 16, 32
    k = torch.zeros(t, h, d, device=DEV, dtype=torch.bfloat16)
    v = torch.zeros_like(k)
    slots = torch.full((t,), -1, device=DEV, dtype=torch.int64)
    cache = torch.zeros(nb, 2, bs, h, d, device=DEV, dtype=torch.bfloat16)
    write_kv_cache(k, v, cache, slots, bs)  # compile outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        write_kv_cache(k, v, cache, slots, bs)
    ref = cache.clone()
    for n in (8, 3, 1):
        k.copy_(torch.randn_like(k))
        v.copy_(torch.randn_like(v))
        s = torch.randperm(nb * bs, device=DEV)[:t]
        s[n:] = -1
        slots.copy_(s)
        graph.replay()
        write_kv_cache_torch(k[:n], v[:n], ref, s[:n], bs)
        assert torch.equal(cache, ref)


KS, PS = (0, 1, 20, 50), (1.0, 0.9, 0.5)


@pytest.mark.parametrize("vocab", [151936, 128256])
@pytest.mark.parametrize("batch", [1, 3, 12, 64, 256])
@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_top_k_top_p_allowed_set(vocab, batch, scale):
    g = torch.Generator(device=DEV).manual_seed(vocab + batch)
    x = torch.randn(batch, vocab, device=DEV, generator=g) * scale
    combos = list(itertools.product(KS, PS))
    k = torch.tensor([combos[i % len(combos)][0] for i in range(batch)], device=DEV)
    p = torch.tensor([combos[i % len(combos)][1] for i in range(batch)], device=DEV, dtype=torch.float32)
    for args in [(k, None, None), (None, p, None), (k, p, None)]:
        out = top_k_top_p_min_p_triton(x.clone(), *args)
        err = check_mask(x, out, *args)
        assert err is None, (args[0] is not None, args[1] is not None, err)


@pytest.mark.parametrize("batch", [1, 64])
def test_min_p_and_all_three(batch):
    g = torch.Generator(device=DEV).manual_seed(7)
    x = torch.randn(batch, 151936, device=DEV, generator=g) * 3
    x[:, ::11] = float("-inf")
    k = torch.tensor([(0, 1, 20, 50)[i % 4] for i in range(batch)], device=DEV)
    p = torch.tensor([(1.0, 0.9, 0.5)[i % 3] for i in range(batch)], device=DEV)
    mp = torch.tensor([(0.0, 0.05, 0.2, 0.001)[i % 4] for i in range(batch)], device=DEV)
    for args in [(None, None, mp), (k, p, mp)]:
        out = top_k_top_p_min_p_triton(x.clone(), *args)
        assert check_mask(x, out, *args) is None
    xb = x.to(torch.bfloat16)  # bf16 logits: many ties
    out = top_k_top_p_min_p_triton(xb.clone(), k, p, mp)
    assert check_mask(xb, out, k, p, mp) is None


def test_sampler_same_tokens_with_and_without_kernel():
    """Seeded sampling through the Sampler: identical tokens with the kernel and with the torch path."""
    from vllm_lite.config import KernelConfig
    from vllm_lite.sample.metadata import SamplingMetadata
    from vllm_lite.sample.sampler import Sampler
    from vllm_lite.sampling_params import SamplingParams
    vocab, b = 151936, 16
    params = [SamplingParams(temperature=0.8, top_k=(0, 1, 20, 50)[i % 4], min_p=(0.0, 0.05)[i % 2], seed=i)
              for i in range(b)]
    x = torch.randn(b, vocab, device=DEV) * 3
    outs = []
    for flag in (True, False):
        gens = [torch.Generator(device=DEV).manual_seed(i) for i in range(b)]
        meta = SamplingMetadata.build(params, [[]] * b, [[]] * b, gens, [set()] * b, DEV, vocab)
        outs.append(Sampler(KernelConfig(sampling_kernel=flag))(x, meta).sampled_token_ids)
    assert torch.equal(outs[0], outs[1])


def test_kernel_dispatch_is_opt_in(monkeypatch):
    """The torch path by default (the kernel measured slower); use_kernel=True (KernelConfig.sampling_kernel,
    VLLM_LITE_SAMPLING_KERNEL=1) selects the kernel."""
    import vllm_lite.kernels.sampling as ks
    from vllm_lite.config import KernelConfig
    from vllm_lite.sample.sampler import Sampler
    x = torch.randn(2, 1000, device=DEV)
    assert ks.kernel_supports(x)
    calls = []
    real = ks.top_k_top_p_min_p_triton
    monkeypatch.setattr(ks, "top_k_top_p_min_p_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    ks.apply_top_k_top_p(x.clone(), torch.tensor([5, 0], device=DEV), None)
    assert not calls
    ks.apply_top_k_top_p(x.clone(), torch.tensor([5, 0], device=DEV), None, use_kernel=True)
    assert calls
    assert not Sampler(KernelConfig()).use_sampling_kernel
    monkeypatch.setenv("VLLM_LITE_SAMPLING_KERNEL", "1")
    assert Sampler().use_sampling_kernel


@pytest.mark.parametrize("hq,hk,d,rot,norm", [(16, 8, 128, 128, True), (32, 8, 128, 128, False),
                                              (9, 3, 64, 64, True), (4, 2, 80, 48, True)])
@pytest.mark.parametrize("t", [1, 7, 300, 1000])
@pytest.mark.parametrize("block_t", [1, 8])
def test_qk_norm_rope_cache_matches_eager(t, hq, hk, d, rot, norm, block_t):
    """The fused q/k RMSNorm + rotary + KV-write kernel against the eager bf16 reference, on strided views of a
    fused projection with padding slots: equal up to rare 1-ulp flips (fp32 sums in another order)."""
    from vllm_lite.kernels.qk_norm_rope import qk_norm_rope_cache_torch, qk_norm_rope_cache_triton
    g = torch.Generator(device=DEV).manual_seed(t)
    dt, bs, nb = torch.bfloat16, 16, 64
    qkv = torch.randn(t, (hq + 2 * hk) * d, device=DEV, generator=g).to(dt)
    q, k, v = qkv[:, :hq * d], qkv[:, hq * d:(hq + hk) * d], qkv[:, (hq + hk) * d:]
    cs = torch.rand(t, rot, device=DEV, generator=g).mul(2).sub(1).to(dt)  # cos/sin-like values in [-1, 1]
    cos, sin = cs[:, :rot // 2], cs[:, rot // 2:]
    qw = (1 + 0.1 * torch.randn(d, device=DEV, generator=g)).to(dt) if norm else None
    kw = (1 + 0.1 * torch.randn(d, device=DEV, generator=g)).to(dt) if norm else None
    slots = torch.randperm(nb * bs, device=DEV, generator=g)[:t]
    slots[1::4] = -1
    cache = torch.zeros(nb, 2, bs, hk, d, device=DEV, dtype=dt)
    want_cache = cache.clone()
    want = qk_norm_rope_cache_torch(q, k, v, cos, sin, qw, kw, 1e-6, d, want_cache, slots, bs, t)
    got = qk_norm_rope_cache_triton(q, k, v, cos, sin, qw, kw, 1e-6, d, cache, slots, bs, t, block_t=block_t)
    assert got.shape == want.shape and got.is_contiguous()
    for a, b in ((got, want), (cache, want_cache)):
        diff = (a.float() - b.float()).abs()
        # One ulp of the rotation's operands (|x| up to ~4 after the norm), not of a result that may cancel.
        assert (diff > 2 ** -6 + b.float().abs() * 2 ** -7).sum() == 0, float(diff.max())
        assert (diff > 0).float().mean() < 0.01


@pytest.mark.parametrize("b", [1, 7, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_cdf_sample_matches_reference_with_given_uniforms(b, dtype, scale):
    """Same uniforms -> the float64 reference's ids at a real vocabulary size (38 chunks per row), except where the
    target lies within float32 rounding of the boundary between two tokens (then either neighbour is right)."""
    from vllm_lite.kernels.cdf_sample import cdf_sample_torch, cdf_sample_triton
    g = torch.Generator(device=DEV).manual_seed(b)
    v = 151936
    x = (torch.randn(b, v, generator=g, device=DEV) * scale).to(dtype)
    t = torch.rand(b, generator=g, device=DEV) + 0.3
    greedy = torch.rand(b, generator=g, device=DEV) < 0.3
    u = torch.rand(b, generator=g, device=DEV)
    want = cdf_sample_torch(x, t, greedy, u=u)
    got = cdf_sample_triton(x, t, greedy, u=u)
    assert torch.equal(got[greedy], want[greedy])
    xs = (x.float() / t.unsqueeze(1)).double()
    cdf = torch.exp(xs - xs.max(1, keepdim=True).values).cumsum(1)
    cdf = cdf / cdf[:, -1:]
    for r in (got != want).nonzero().view(-1).tolist():
        lo = float(cdf[r, got[r] - 1]) if got[r] > 0 else 0.0
        assert lo - 1e-5 <= float(u[r]) <= float(cdf[r, got[r]]) + 1e-5, (r, int(got[r]), int(want[r]))
    assert int((got != want).sum()) <= max(1, b // 50)


def test_cdf_sample_distribution_and_sampler_path():
    """In-kernel uniforms: frequencies follow softmax(x / T); the Sampler takes this path for temperature-only
    batches."""
    from vllm_lite.kernels.cdf_sample import cdf_sample_triton
    from vllm_lite.sample.metadata import SamplingMetadata
    from vllm_lite.sample.sampler import Sampler, _one_pass_random
    from vllm_lite.sampling_params import SamplingParams
    g = torch.Generator(device=DEV).manual_seed(0)
    row = torch.randn(1, 10000, generator=g, device=DEV) * 2
    n = 200_000
    ids = cdf_sample_triton(row.expand(n, -1).contiguous(), torch.full((n,), 0.7, device=DEV),
                            torch.zeros(n, dtype=torch.bool, device=DEV), chunk=1024)
    p = torch.softmax(row[0].double() / 0.7, -1)
    top = p.topk(32).indices
    freq = torch.bincount(ids, minlength=10000).double() / n
    assert (freq[top] - p[top]).abs().max() < 0.005, (freq[top], p[top])
    assert abs(float(freq.sum() - freq[top].sum()) - float(1 - p[top].sum())) < 0.005  # the tail's mass too
    params = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.0), SamplingParams(temperature=0.5)]
    meta = SamplingMetadata.build(params=params, prompt_token_ids=[[]] * 3, output_token_ids=[[]] * 3,
                                  generators=[None] * 3, stop_ids_blocked=[set()] * 3, device=torch.device(DEV),
                                  vocab_size=1000)
    logits = torch.randn(3, 1000, device=DEV, dtype=torch.bfloat16)
    assert _one_pass_random(logits, meta)
    out = Sampler()(logits, meta).sampled_token_ids
    assert out.shape == (3,) and int(out[1]) == int(logits[1].argmax())


@pytest.mark.parametrize("use_dot", [False, True])
@pytest.mark.parametrize("m", [1, 3, 8, 16])
@pytest.mark.parametrize("n,k", [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072)])
def test_skinny_gemm_matches_cublas(m, n, k, use_dot):
    """The decode-sized GEMM kernel on qwen3-0.6b's projection shapes, eager and replayed from a CUDA graph, and the
    `vllm_lite::skinny_linear` op taking it where decode_config says it wins (F.linear elsewhere)."""
    import vllm_lite.compile.custom_ops  # noqa: F401  (registers torch.ops.vllm_lite.*)
    from vllm_lite.kernels.skinny_gemm import decode_config, skinny_gemm_triton
    g = torch.Generator(device=DEV).manual_seed(m * 7 + n + k)
    x = torch.randn(m, k, device=DEV, generator=g).to(torch.bfloat16)
    w = (torch.randn(n, k, device=DEV, generator=g) * 0.02).to(torch.bfloat16)
    want = (x.float() @ w.float().t()).to(torch.bfloat16)
    torch.testing.assert_close(skinny_gemm_triton(x, w, use_dot=use_dot), want, rtol=2 ** -7, atol=1e-3)
    graph, out = torch.cuda.CUDAGraph(), None
    with torch.cuda.graph(graph):
        out = skinny_gemm_triton(x, w, use_dot=use_dot)
    x.copy_(torch.randn(m, k, device=DEV, generator=g))
    graph.replay()
    torch.testing.assert_close(out, (x.float() @ w.float().t()).to(torch.bfloat16), rtol=2 ** -7, atol=1e-3)
    config = decode_config(m, n, k)  # the op takes the measured-best setting, or F.linear
    via_op = torch.ops.vllm_lite.skinny_linear(x, w, None)
    direct = skinny_gemm_triton(x, w, **config) if config else torch.nn.functional.linear(x, w)
    torch.testing.assert_close(via_op, direct, rtol=0, atol=0)
    big = torch.randn(17, k, device=DEV, generator=g).to(torch.bfloat16)
    torch.testing.assert_close(torch.ops.vllm_lite.skinny_linear(big, w, None), torch.nn.functional.linear(big, w))


def test_skinny_gemm_float32_is_float32():
    """Float32 operands are not rounded to TF32 (tl.dot's default): the tl.dot setting of 3-4 rows agrees with a
    float64 product to float32 accuracy (TF32's 10-bit mantissas are off by ~1e-2 here)."""
    import vllm_lite.compile.custom_ops  # noqa: F401 (registers vllm_lite::skinny_linear)
    from vllm_lite.kernels.skinny_gemm import skinny_gemm_triton
    g = torch.Generator(device=DEV).manual_seed(3)
    x = torch.randn(4, 1024, device=DEV, generator=g)
    w = torch.randn(2048, 1024, device=DEV, generator=g)
    want = (x.double() @ w.double().t()).float()
    for use_dot in (False, True):
        assert (skinny_gemm_triton(x, w, use_dot=use_dot) - want).abs().max().item() < 1e-3
    assert (torch.ops.vllm_lite.skinny_linear(x[:3], w, None) - want[:3]).abs().max().item() < 1e-3


def test_bitmask_warm_up_compiles_the_only_variant_steps_use():
    """After warm_up_bitmask_kernel, staged masks of any row count (odd and even) compile nothing more."""
    from vllm_lite.kernels.bitmask import _apply_bitmask_kernel, apply_bitmask_torch, warm_up_bitmask_kernel
    from vllm_lite.protocol import GrammarOutput
    from vllm_lite.sample.bitmask import GrammarBitmaskApplier
    vocab, dev = 49152, torch.device("cuda")
    warm_up_bitmask_kernel(vocab, dev, torch.bfloat16)

    def variants() -> int:
        return sum(len(entry[0]) for entry in _apply_bitmask_kernel.device_caches.values())
    before = variants()
    applier = GrammarBitmaskApplier(dev)
    g = torch.Generator().manual_seed(0)
    for m in (1, 2, 3, 5, 4):
        words = torch.randint(-2**31, 2**31 - 1, (m, vocab // 32), dtype=torch.int32, generator=g)
        logits = torch.randn(m + 1, vocab, generator=g).to(dev, torch.bfloat16)
        want = logits.clone()
        apply_bitmask_torch(want, words.to(dev), torch.arange(m, device=dev))
        ids = [str(i) for i in range(m + 1)]
        applier.apply(logits, GrammarOutput(ids[:m], [1] * m, vocab // 32, words.numpy().tobytes()), ids,
                      list(range(m + 2)))
        assert torch.equal(logits, want)
    torch.cuda.synchronize()
    assert variants() == before


def test_bitmask_filled_in_the_lent_host_buffer():
    """Masks the engine core fills straight into the applier's pinned buffer (host_buffer) mask the logits as staged
    ones do, step after step with the two buffers alternating; a lent array the step did not use as it is (rows
    reordered: copied) and a lent array never applied leave the next steps right."""
    from vllm_lite.kernels.bitmask import apply_bitmask_torch
    from vllm_lite.protocol import GrammarOutput
    from vllm_lite.sample.bitmask import GrammarBitmaskApplier
    vocab, dev = 49152, torch.device("cuda")
    w = vocab // 32
    applier = GrammarBitmaskApplier(dev)
    g = torch.Generator().manual_seed(1)
    for step, m in enumerate((3, 4, 4, 1, 6, 2, 5)):
        words = torch.randint(-2**31, 2**31 - 1, (m, w), dtype=torch.int32, generator=g)
        logits = torch.randn(m, vocab, generator=g).to(dev, torch.bfloat16)
        want = logits.clone()
        ids = [str(i) for i in range(m)]
        lent = applier.host_buffer(m, w)
        assert lent is not None and lent.shape == (m, w)
        if step == 3:  # never applied: the next call lends again
            lent[:] = 0
            lent = applier.host_buffer(m, w)
        lent[:] = words.numpy()
        if step == 4:  # reversed grammar order: the words are gathered (a copy), not used in place
            apply_bitmask_torch(want, words.to(dev), torch.arange(m - 1, -1, -1, device=dev))
            applier.apply(logits, GrammarOutput(ids[::-1], [1] * m, w, memoryview(lent).cast("B")), ids,
                          list(range(m + 1)))
        else:
            apply_bitmask_torch(want, words.to(dev), torch.arange(m, device=dev))
            applier.apply(logits, GrammarOutput(ids, [1] * m, w, memoryview(lent).cast("B")), ids, list(range(m + 1)))
        assert torch.equal(logits, want), step


def test_cdf_sample_warm_up_covers_every_seed_and_batch():
    """The per-step random seed is not specialised: after warm_up_cdf_sample, seeds 1, 16, 7 and any batch size
    compile nothing more (a seed divisible by 16 once compiled a new variant mid-serving)."""
    from vllm_lite.kernels.cdf_sample import _chunk_stats_kernel, _pick_kernel, cdf_sample_triton, warm_up_cdf_sample
    vocab, dev = 49152, torch.device("cuda")
    warm_up_cdf_sample(vocab, dev, torch.bfloat16)

    def variants() -> int:
        return sum(len(entry[0]) for k in (_chunk_stats_kernel, _pick_kernel) for entry in k.device_caches.values())
    before = variants()
    for b, seed in ((1, 1), (2, 16), (3, 7), (5, 32)):
        logits = torch.randn(b, vocab, device=dev).to(torch.bfloat16)
        out = cdf_sample_triton(logits, torch.full((b,), 0.8, device=dev), torch.zeros(b, dtype=torch.bool, device=dev),
                                seed=seed)
        assert out.shape == (b,) and bool(((out >= 0) & (out < vocab)).all())
    torch.cuda.synchronize()
    assert variants() == before
