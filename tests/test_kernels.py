"""Triton kernels (kernels/) vs their plain-PyTorch references, on the CPU through the Triton interpreter.

The interpreter has to be switched on before triton decorates the kernels, so the checks run in one child process
with TRITON_INTERPRET=1 (small shapes: the interpreter is slow). Skipped with a reason if triton is not
importable. `check_mask` is shared with tests/gpu/test_kernels_gpu.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP_P_TOL = 5e-5  # top-p boundary: float32 cumsum (reference) vs blockwise sums (kernel)


def reference_mask(x: torch.Tensor, k, p, min_p) -> torch.Tensor:
    from vllm_lite.kernels.sampling import apply_min_p_torch, apply_top_k_top_p_torch
    ref = x.float().clone()
    if min_p is not None:
        ref = apply_min_p_torch(ref, min_p)
    if k is not None or p is not None:
        ref = apply_top_k_top_p_torch(ref, k, p)
    return ref


def check_mask(x: torch.Tensor, out: torch.Tensor, k, p, min_p) -> str | None:
    """None if `out` (kernel result on logits x) keeps exactly the reference's allowed set and leaves kept logits
    untouched; top-p may differ only on tokens whose strictly-greater mass is within TOP_P_TOL of p, or that tie
    with the reference's last kept token (the kernel keeps a whole tie group at the top-p boundary)."""
    x32 = x.float()
    ref = reference_mask(x32, k, p, min_p)
    got_keep, ref_keep = out.float() > float("-inf"), ref > float("-inf")
    if not torch.equal(out.float()[got_keep], x32[got_keep]):
        return "kept logits were modified"
    bad = got_keep != ref_keep
    if not bad.any():
        return None
    if p is None:
        return f"{int(bad.sum())} tokens differ (no top-p)"
    # Which differences are top-p boundary rounding? Strictly-greater mass in float64 over the pre-top-p set.
    pre = reference_mask(x32, k, None, min_p).double() if (k is not None or min_p is not None) else x32.double()
    probs = torch.softmax(pre, dim=-1)
    for r, c in bad.nonzero().tolist():
        if got_keep[r, c] and x32[r, c] == ref[r][ref_keep[r]].min():
            continue  # tied with the reference's last kept token: a sort keeps only some of a tie, the kernel all
        s_gt = float(probs[r][pre[r] > pre[r, c]].sum())
        if abs(s_gt - float(p[r])) > TOP_P_TOL:
            return f"row {r} token {c}: kept={bool(got_keep[r, c])} ref={bool(ref_keep[r, c])} " \
                   f"greater-mass {s_gt:.7f} vs p {float(p[r])}"
    return None


_CHILD_KV = textwrap.dedent(r"""
    import json, sys, torch
    sys.path.insert(0, sys.argv[1] + "/tests")
    from test_kernels import check_mask
    res = {}
    g = torch.Generator().manual_seed(0)
    from vllm_lite.kernels.kv_cache import write_kv_cache_triton, write_kv_cache_torch
    # ---- KV-cache write: dtypes, GQA shapes, non-power-of-2 head dim, padding rows, strided k/v
    for (t, h, d, bs, kdt, cdt) in [(1, 8, 128, 16, torch.bfloat16, torch.bfloat16), (7, 2, 64, 16, torch.float16,
            torch.float16), (33, 1, 80, 8, torch.float32, torch.float32), (5, 4, 128, 16, torch.float32,
            torch.bfloat16), (9, 3, 96, 4, torch.bfloat16, torch.float32)]:
        nb = 12
        qkv = torch.randn(t, (2 + 2) * h * d, generator=g).to(kdt)
        k = qkv[:, 2 * h * d:3 * h * d].view(t, h, d)   # strided views, as sliced out of a fused projection
        v = qkv[:, 3 * h * d:].view(t, h, d)
        slots = torch.randperm(nb * bs, generator=g)[:t]
        slots[::3] = -1  # padding rows
        cache = torch.randn(nb, 2, bs, h, d, generator=g).to(cdt)
        ref = cache.clone()
        valid = slots >= 0
        write_kv_cache_torch(k[valid], v[valid], ref, slots[valid], bs)
        write_kv_cache_triton(k, v, cache, slots, bs)
        if kdt.itemsize > cdt.itemsize:  # the interpreter truncates on downcast (the GPU rounds like torch)
            same = torch.allclose(cache.float(), ref.float(), rtol=2 ** -7, atol=0)
        else:
            same = torch.equal(cache, ref)
        res[f"kv_{t}_{h}_{d}_{kdt}_{cdt}"] = same

    # ---- fused q/k RMSNorm + rotary + KV write vs the reference: fp32 to 1e-5; bf16 within a few ulps of the
    # operands (the interpreter truncates where the GPU rounds to nearest, and x1*cos - x2*sin cancels; exactness
    # is a GPU test). Strided q/k/v views, padding slots (-1), rows past num_write left alone.
    from vllm_lite.kernels.qk_norm_rope import qk_norm_rope_cache_torch, qk_norm_rope_cache_triton
    for (t, hq, hk, d, rot, norm, dt, nw) in [(5, 4, 2, 64, 64, True, torch.float32, 5), (3, 16, 8, 128, 128, True,
            torch.bfloat16, 3), (7, 8, 8, 64, 64, False, torch.float32, 4), (2, 3, 1, 80, 48, True, torch.float32, 2),
            (1, 9, 3, 64, 64, False, torch.bfloat16, 1)]:
        bs, nb = 4, 8
        qkv = torch.randn(t, (hq + 2 * hk) * d, generator=g).to(dt)
        q, k, v = qkv[:, :hq * d], qkv[:, hq * d:(hq + hk) * d], qkv[:, (hq + hk) * d:]
        cs = torch.randn(t, rot, generator=g).to(dt)
        cos, sin = cs[:, :rot // 2], cs[:, rot // 2:]
        qw = (1 + 0.1 * torch.randn(d, generator=g)).to(dt) if norm else None
        kw = (1 + 0.1 * torch.randn(d, generator=g)).to(dt) if norm else None
        slots = torch.randperm(nb * bs, generator=g)[:t]
        slots[1::3] = -1
        cache = torch.randn(nb, 2, bs, hk, d, generator=g).to(dt)
        want_cache = cache.clone()
        want = qk_norm_rope_cache_torch(q, k, v, cos, sin, qw, kw, 1e-6, d, want_cache, slots, bs, nw)
        tol = dict(rtol=1e-5, atol=1e-5) if dt == torch.float32 else dict(rtol=2 ** -5, atol=2 ** -3)
        start = cache.clone()
        for block_t in (1, 4):  # one token per program (decode) and several, with a partial last tile (prefill)
            cache = start.clone()
            got = qk_norm_rope_cache_triton(q, k, v, cos, sin, qw, kw, 1e-6, d, cache, slots, bs, nw, block_t=block_t)
            res[f"qkrope_{t}_{hq}_{hk}_{d}_{rot}_{norm}_{dt}_bt{block_t}"] = (
                got.shape == want.shape and got.is_contiguous() and torch.allclose(got.float(), want.float(), **tol)
                and torch.allclose(cache.float(), want_cache.float(), **tol))
    print("RESULT" + json.dumps({kk: (vv if isinstance(vv, bool) else str(vv)) for kk, vv in res.items()}))
""")

_CHILD_SAMPLING = textwrap.dedent(r"""
    import json, sys, torch
    sys.path.insert(0, sys.argv[1] + "/tests")
    from test_kernels import check_mask
    res = {}
    g = torch.Generator().manual_seed(0)
    from vllm_lite.kernels.sampling import top_k_top_p_min_p_triton
    # ---- top-k / top-p / min-p masks
    def run(name, x, k, p, mp):
        out = top_k_top_p_min_p_triton(x.clone(), k, p, mp)
        res[name] = check_mask(x, out, k, p, mp) or True

    B, V = 8, 2053
    x = torch.randn(B, V, generator=g) * 2
    k = torch.tensor([0, 1, 2, 20, 50, V, V + 5, 1000])
    p = torch.tensor([0.9, 1.0, 0.5, 0.95, 0.3, 0.9, 0.01, 0.7])
    mp = torch.tensor([0.0, 0.1, 0.0, 0.05, 0.0, 0.2, 0.0, 0.01])
    for name, args in [("topk", (k, None, None)), ("topp", (None, p, None)), ("topk_topp", (k, p, None)),
                       ("minp", (None, None, mp)), ("all", (k, p, mp))]:
        run(name, x, *args)
    xi = x.clone()
    xi[:, ::7] = float("-inf")  # grammar-masked tokens
    xi[3, :-10] = float("-inf")  # fewer finite tokens than k
    xi[5] = float("-inf")        # fully masked row: left alone
    run("neg_inf", xi, k, p, mp)
    xt = (x * 2).round() / 2     # heavy ties: top-k keeps every token tied with the k-th
    run("ties_topk_minp", xt, k, None, mp)
    run("bf16", x.to(torch.bfloat16), k, p, mp)
    xf = torch.randn(4, 4096, generator=g)  # V a multiple of the tile
    run("topp_tile_multiple", xf, None, torch.tensor([0.9, 0.5, 0.99, 0.1]), None)
    print("RESULT" + json.dumps({kk: (vv if isinstance(vv, bool) else str(vv)) for kk, vv in res.items()}))
""")


_CHILD_CDF = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, sys.argv[1])
    from vllm_lite.kernels.cdf_sample import cdf_sample_torch, cdf_sample_triton
    g = torch.Generator().manual_seed(0)
    res = {}
    # Exact: the same uniforms u -> the same ids as the float64 reference (chunks of 128: V spans 8 + a tail).
    b, v = 6, 1000
    x = torch.randn(b, v, generator=g) * 3
    x[1, 3] = 1e4  # a clear winner in the first chunk, another in the last one
    x[4, 999] = 1e4
    x[2, 256:384] = float("-inf")  # a chunk without mass
    t = torch.tensor([1.0, 0.5, 1.0, 2.0, 1.0, 0.7])
    greedy = torch.tensor([False, False, True, False, False, True])
    for name, logits in (("f32", x), ("bf16", x.to(torch.bfloat16))):
        ok = True
        for _ in range(4):
            u = torch.rand(b, generator=g)
            u[0] = 0.0  # both ends of the range
            u[3] = 1.0 - 2 ** -24
            want = cdf_sample_torch(logits, t, greedy, u=u)
            got = cdf_sample_triton(logits, t, greedy, u=u, chunk=128)
            ok = ok and (bool(torch.equal(want, got)) or f"{want.tolist()} vs {got.tolist()}")
        res["exact_" + name] = ok
    picked = cdf_sample_triton(x, t, greedy, chunk=128)
    res["greedy_rows_argmax"] = bool(torch.equal(picked[greedy], x[greedy].argmax(1)))
    # In-kernel noise: frequencies over 1200 draws of one 8-token row match softmax(x / T) (sd of each <= 0.015).
    row = torch.randn(1, 8, generator=g)
    n = 1200
    ids = cdf_sample_triton(row.expand(n, 8).contiguous(), torch.full((n,), 0.8), torch.zeros(n, dtype=torch.bool),
                            seed=1234, chunk=4)
    freq = torch.bincount(ids, minlength=8).double() / n
    p = torch.softmax(row[0].double() / 0.8, -1)
    res["distribution"] = bool((freq - p).abs().max() < 0.06) or f"{freq.tolist()} vs {p.tolist()}"
    print("RESULT" + json.dumps(res))
""")


_CHILD_SKINNY = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, sys.argv[1])
    from vllm_lite.kernels.skinny_gemm import skinny_gemm_torch, skinny_gemm_triton
    g = torch.Generator().manual_seed(0)
    res = {}
    for m, n, k, dt, bn in [(1, 64, 256, torch.float32, None), (3, 40, 100, torch.float32, 8),
                            (16, 72, 96, torch.float32, 16), (5, 64, 160, torch.bfloat16, None),
                            (16, 24, 64, torch.bfloat16, 8)]:
        wide = torch.randn(m, k + 7, generator=g).to(dt)
        x = wide[:, :k]  # rows strided past K, as a slice of a fused projection's output would be
        w = torch.randn(n, k, generator=g).to(dt)
        want = skinny_gemm_torch(x, w)
        tol = dict(rtol=1e-4, atol=1e-4) if dt == torch.float32 else dict(rtol=2 ** -7, atol=2 ** -5)
        for dot in (False, True) if dt == torch.float32 else (False,):  # the interpreter's bf16 tl.dot is garbage
            got = skinny_gemm_triton(x, w, block_n=bn, num_sms=4, use_dot=dot)
            res[f"{m}x{n}x{k}_{dt}_{bn}_{dot}"] = (got.shape == want.shape and got.dtype == want.dtype
                                                  and torch.allclose(got.float(), want.float(), **tol)) or "mismatch"
    print("RESULT" + json.dumps(res))
""")


def _run_child(code: str) -> dict:
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.skip("triton is not importable here (pip install triton); the Triton interpreter checks need it")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code, ROOT], env=env, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"interpreter run failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(lines[-1][len("RESULT"):])


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    return _run_child(_CHILD_KV)


@pytest.fixture(scope="module")
def sampling_results() -> dict:
    return _run_child(_CHILD_SAMPLING)


@pytest.fixture(scope="module")
def cdf_results() -> dict:
    return _run_child(_CHILD_CDF)


@pytest.mark.parametrize("case", ["exact_f32", "exact_bf16", "greedy_rows_argmax", "distribution"])
def test_cdf_sample_matches_reference(cdf_results, case):
    assert cdf_results[case] is True, cdf_results[case]


def test_kv_cache_write_matches_reference(interpreter_results):
    kv = {k: v for k, v in interpreter_results.items() if k.startswith("kv_")}
    assert len(kv) == 5
    assert all(v is True for v in kv.values()), kv


@pytest.mark.parametrize("case", ["topk", "topp", "topk_topp", "minp", "all", "neg_inf", "ties_topk_minp", "bf16",
                                  "topp_tile_multiple"])
def test_sampling_mask_matches_reference(sampling_results, case):
    assert sampling_results[case] is True, sampling_results[case]


def test_qk_norm_rope_matches_reference(interpreter_results):
    got = {k: v for k, v in interpreter_results.items() if k.startswith("qkrope_")}
    assert len(got) == 10
    assert all(v is True for v in got.values()), got


@pytest.mark.parametrize("use_kernel", [False, True])
def test_cpu_dispatch_uses_reference(use_kernel):
    """On CPU tensors the public entry points are the torch references (no triton needed), whatever the switch."""
    from vllm_lite.kernels.sampling import apply_min_p, apply_top_k_top_p, top_k_top_p_min_p
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 100, generator=g)
    k, p, mp = torch.tensor([5, 0, 10]), torch.tensor([0.9, 0.5, 1.0]), torch.tensor([0.1, 0.0, 0.0])
    out = apply_top_k_top_p(apply_min_p(x.clone(), mp, use_kernel=use_kernel), k, p, use_kernel=use_kernel)
    assert torch.equal(out, reference_mask(x, k, p, mp))
    assert torch.equal(top_k_top_p_min_p(x.clone(), k, p, mp, use_kernel=use_kernel), out)
    from vllm_lite.kernels.kv_cache import write_kv_cache, write_kv_cache_torch
    cache, ref = torch.zeros(4, 2, 4, 2, 8), torch.zeros(4, 2, 4, 2, 8)
    kk, vv, slots = torch.randn(3, 2, 8, generator=g), torch.randn(3, 2, 8, generator=g), torch.tensor([0, 5, 14])
    write_kv_cache(kk, vv, cache, slots, 4, use_kernel=use_kernel)
    write_kv_cache_torch(kk, vv, ref, slots, 4)
    assert torch.equal(cache, ref)


def test_references_have_one_implementation():
    """The torch references live in kernels/ and the upper layers re-export the same objects (no copies)."""
    from vllm_lite.attention import torch_backend
    from vllm_lite.kernels import kv_cache, qk_norm_rope, sampling
    from vllm_lite.layers import norm
    from vllm_lite.sample import topk_topp
    assert torch_backend.write_kv_cache is kv_cache.write_kv_cache_torch
    assert norm.rms_norm_ref is qk_norm_rope.rms_norm_ref
    for name in ("apply_min_p", "apply_top_k_top_p", "apply_min_p_torch", "apply_top_k_top_p_torch"):
        assert getattr(topk_topp, name) is getattr(sampling, name)


def test_skinny_gemm_matches_reference():
    """The decode-sized GEMM kernel: M of 1-16 rows (with a row stride past K), partial column and K blocks, float32
    and bf16, forced and automatic column blocks, multiply-reduce and (float32 only here: the interpreter's bf16
    tl.dot is wrong; tests/gpu covers it) tl.dot accumulation."""
    res = _run_child(_CHILD_SKINNY)
    assert len(res) == 8 and all(v is True for v in res.values()), res


def test_skinny_decode_config_takes_the_kernel_only_where_it_measured_faster():
    """decode_config: multiply-accumulate for 1-2 rows, tl.dot for 3-4, cuBLAS (None) from 5 rows and for weights
    larger than the measured Qwen3-0.6B shapes (llama-3.1-8b's projections stay on cuBLAS)."""
    from vllm_lite.kernels.skinny_gemm import decode_config
    one = decode_config(1, 4096, 1024)
    assert one == decode_config(2, 1024, 3072) and not one.get("use_dot") and one["block_n"] == 8
    assert decode_config(3, 4096, 1024)["use_dot"] and decode_config(4, 1024, 2048)["use_dot"]
    assert decode_config(5, 4096, 1024) is None and decode_config(16, 4096, 1024) is None
    assert decode_config(1, 6144, 1024) is not None and decode_config(1, 4096, 2048) is None  # measured sizes only
    assert decode_config(1, 6144, 4096) is None and decode_config(1, 4096, 14336) is None


# ---- kernel switches: one KernelConfig, read from the environment once ------------------------------------------
KERNEL_VARS = ("VLLM_LITE_KV_WRITE_KERNEL", "VLLM_LITE_SAMPLING_KERNEL", "VLLM_LITE_SKINNY_GEMM",
               "VLLM_LITE_FLASHINFER_TENSOR_CORES")


@pytest.fixture
def clean_kernel_env(monkeypatch):
    for var in KERNEL_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_kernel_config_defaults_are_todays_behaviour(clean_kernel_env):
    from vllm_lite.config import EngineConfig, KernelConfig
    want = KernelConfig(kv_write_kernel=True, sampling_kernel=False, skinny_gemm=True, flashinfer_tensor_cores=None)
    assert KernelConfig() == want
    assert KernelConfig.from_env() == want
    assert EngineConfig().kernels == want and EngineConfig.from_kwargs().kernels == want


def test_kernel_config_from_env_read_once(clean_kernel_env):
    import dataclasses
    from vllm_lite import envs
    from vllm_lite.config import EngineConfig
    mp = clean_kernel_env
    mp.setenv("VLLM_LITE_KV_WRITE_KERNEL", "0")
    mp.setenv("VLLM_LITE_SAMPLING_KERNEL", "1")
    mp.setenv("VLLM_LITE_SKINNY_GEMM", "0")
    mp.setenv("VLLM_LITE_FLASHINFER_TENSOR_CORES", "0")
    calls = []
    real = envs.kernel_defaults
    mp.setattr(envs, "kernel_defaults", lambda: calls.append(1) or real())
    config = EngineConfig.from_kwargs(model="m")
    assert len(calls) == 1  # once per config, never per forward
    k = config.kernels
    assert (k.kv_write_kernel, k.sampling_kernel, k.skinny_gemm, k.flashinfer_tensor_cores) == (False, True, False,
                                                                                                False)
    mp.setenv("VLLM_LITE_SAMPLING_KERNEL", "0")  # later changes do not reach a built config (frozen)
    assert config.kernels.sampling_kernel is True
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.kernels.sampling_kernel = False
    mp.setenv("VLLM_LITE_SKINNY_GEMM", "maybe")
    with pytest.raises(ValueError, match="VLLM_LITE_SKINNY_GEMM"):
        EngineConfig.from_kwargs()


def test_kernel_config_engine_arguments_override_env(clean_kernel_env):
    from vllm_lite.config import EngineConfig, KernelConfig
    clean_kernel_env.setenv("VLLM_LITE_SAMPLING_KERNEL", "1")
    clean_kernel_env.setenv("VLLM_LITE_FLASHINFER_TENSOR_CORES", "1")
    config = EngineConfig.from_kwargs(sampling_kernel=False, kv_write_kernel=False, skinny_gemm=False,
                                      flashinfer_tensor_cores=None)  # None: not given -> the environment's
    assert config.kernels == KernelConfig(kv_write_kernel=False, sampling_kernel=False, skinny_gemm=False,
                                          flashinfer_tensor_cores=True)
    assert EngineConfig.from_kwargs(flashinfer_tensor_cores=False).kernels.flashinfer_tensor_cores is False
    with pytest.raises(ValueError, match="skinny_gemm"):
        KernelConfig(skinny_gemm="no")
    with pytest.raises(ValueError, match="unknown engine argument"):
        EngineConfig.from_kwargs(skinny=True)


def test_per_step_integers_are_not_specialised():
    """Triton specialises integer arguments (== 1, divisible by 16): one that changes every step (the sampler's
    random seed, a prefill's token counts) would compile new variants on the serving path at unpredictable steps."""
    pytest.importorskip("triton")
    from vllm_lite.kernels.cdf_sample import _pick_kernel
    from vllm_lite.kernels.qk_norm_rope import _qk_norm_rope_cache_kernel
    for kernel, names in ((_pick_kernel, {"seed"}), (_qk_norm_rope_cache_kernel, {"num_tokens", "num_write"})):
        assert {p.name for p in kernel.params if p.do_not_specialize} == names
