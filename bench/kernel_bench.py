"""Micro-benchmark of the Triton kernels (kernels/) against their torch references and inductor (torch.compile of
the reference), at decode-like sizes. Prints tables of microseconds per call (median of repeats), each timed two
ways: `eager` = back-to-back launches timed with CUDA events (includes launch overhead), `graph` = the same calls
captured in a CUDA graph and replayed (device time only, as under CUDA-graph decode).

    python bench/kernel_bench.py [--quick]

Sampling rows start from a fresh copy of the logits each call (the filters work in place); the copy alone is
timed too ("copy") so it can be subtracted. Keep a kernel only where it wins.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch


def _time(fn, eager_iters=50, graph_calls=20, repeats=5) -> tuple[float, float]:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    eager = []
    for _ in range(repeats):
        start.record()
        for _ in range(eager_iters):
            fn()
        end.record()
        end.synchronize()
        eager.append(start.elapsed_time(end) * 1000 / eager_iters)
    graph_us = float("nan")
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(graph_calls):
                fn()
        g.replay()
        torch.cuda.synchronize()
        gt = []
        for _ in range(repeats):
            start.record()
            g.replay()
            end.record()
            end.synchronize()
            gt.append(start.elapsed_time(end) * 1000 / graph_calls)
        graph_us = statistics.median(gt)
    except Exception as e:  # noqa: BLE001 - a variant that cannot be captured just shows nan
        print(f"  (graph capture failed: {type(e).__name__}: {str(e)[:100]})", file=sys.stderr)
    return statistics.median(eager), graph_us


def _safe_time(fn, **kw) -> tuple[float, float]:
    """_time, or nan when the variant fails (inductor cannot compile some references on some torch versions)."""
    try:
        return _time(fn, **kw)
    except Exception as e:  # noqa: BLE001 - report and go on with the other columns
        print(f"  (failed: {type(e).__name__}: {str(e).splitlines()[0][:100]})", file=sys.stderr)
        return float("nan"), float("nan")


def _row(name: str, cols: list[tuple[float, float]]) -> str:
    return f"{name:<34}" + "".join(f"{e:>10.1f}{g:>9.1f}" for e, g in cols)


def bench_kv_write(quick: bool) -> None:
    from vllm_lite.kernels.kv_cache import write_kv_cache_torch, write_kv_cache_triton
    h, d, bs, nb = 8, 128, 16, 4096
    compiled = torch.compile(write_kv_cache_torch, dynamic=True)
    print(f"\nKV-cache write: k,v [T, {h}, {d}] bf16 -> cache [{nb}, 2, {bs}, {h}, {d}]; us (eager / graph)")
    print(f"{'T':<34}" + "".join(f"{n:>19}" for n in ("torch", "inductor", "triton")))
    for t in ((1, 64, 256) if quick else (1, 8, 32, 64, 128, 256)):
        cache = torch.zeros(nb, 2, bs, h, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(t, h, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        slots = torch.randperm(nb * bs, device="cuda")[:t]
        cols = [_time(lambda: write_kv_cache_torch(k, v, cache, slots, bs)),
                _safe_time(lambda: compiled(k, v, cache, slots, bs)),
                _time(lambda: write_kv_cache_triton(k, v, cache, slots, bs))]
        print(_row(str(t), cols))


def bench_qk_norm_rope(quick: bool) -> None:
    """The fused q/k RMSNorm + rotary + KV write (one launch) against the same steps in torch and inductor."""
    from vllm_lite.kernels.qk_norm_rope import qk_norm_rope_cache_torch, qk_norm_rope_cache_triton
    hq, hk, d, bs, nb = 16, 8, 128, 16, 4096
    compiled = torch.compile(qk_norm_rope_cache_torch, dynamic=True)
    print(f"\nq/k RMSNorm + rotary + KV write, qwen3-0.6b heads ({hq}/{hk} x {d}) bf16; us (eager / graph)")
    print(f"{'T':<34}" + "".join(f"{n:>19}" for n in ("torch", "inductor", "triton")))
    def inputs(t: int) -> tuple:
        """Strided q/k/v views of one fused projection, cos/sin, unit norm weights, a cache with room for t slots."""
        qkv = torch.randn(t, (hq + 2 * hk) * d, device="cuda", dtype=torch.bfloat16)
        q, k, v = qkv[:, :hq * d], qkv[:, hq * d:(hq + hk) * d], qkv[:, (hq + hk) * d:]
        cs = torch.rand(t, d, device="cuda", dtype=torch.bfloat16)
        ones = torch.ones(d, device="cuda", dtype=torch.bfloat16)
        cache = torch.zeros(max(nb, t // bs + 1), 2, bs, hk, d, device="cuda", dtype=torch.bfloat16)
        slots = torch.randperm(cache.shape[0] * bs, device="cuda")[:t]
        return (q, k, v, cs[:, :d // 2], cs[:, d // 2:], ones, ones, 1e-6, d, cache, slots, bs, t)

    for t in ((1, 8, 256) if quick else (1, 8, 32, 64, 256, 2048)):
        args = inputs(t)
        cols = [_time(lambda: qk_norm_rope_cache_torch(*args)), _safe_time(lambda: compiled(*args)),
                _time(lambda: qk_norm_rope_cache_triton(*args))]
        print(_row(str(t), cols))
    variants = [(1, 1), (2, 1), (4, 2), (8, 4), (8, 2), (16, 4), (16, 8)]
    print("\nTriton tokens per program / warps, graph us (GB/s moved)")
    print(f"{'T':<8}" + "".join(f"{f'{bt}/{w}':>18}" for bt, w in variants))
    for t in (1, 64, 256, 2048, 8192):
        args = inputs(t)
        moved = t * (hq + 2 * hk) * d * 2 * 2 + t * d * 2  # read q/k/v and write q/k/v, read cos/sin
        res = []
        for bt, w in variants:
            us = _time(lambda: qk_norm_rope_cache_triton(*args, block_t=bt, num_warps=w), eager_iters=10,
                       repeats=3)[1]
            res.append(f"{us:.1f} ({moved / us / 1e3:.0f})")
        print(f"{t:<8}" + "".join(f"{r:>18}" for r in res))


def bench_sampling(quick: bool) -> None:
    from vllm_lite.kernels.sampling import apply_min_p_torch, apply_top_k_top_p_torch, top_k_top_p_min_p_triton
    vocab = 151936

    def ref(x, k, p, mp, max_k):
        if mp is not None:
            x = apply_min_p_torch(x, mp)
        if k is not None or p is not None:
            x = apply_top_k_top_p_torch(x, k, p, max_k=max_k)  # max_k as the Sampler passes it: no sync
        return x

    compiled = torch.compile(ref, dynamic=True)
    configs = {"top_k=50": (50, None, None), "top_p=0.9": (None, 0.9, None), "top_k=50 top_p=0.9": (50, 0.9, None),
               "min_p=0.05": (None, None, 0.05), "min_p+top_k+top_p": (50, 0.9, 0.05)}
    batches = (1, 16, 256) if quick else (1, 4, 16, 64, 128, 256)
    print(f"\nTop-k/top-p/min-p mask, logits [B, {vocab}] fp32 (randn*3); us (eager / graph), copy included")
    print(f"{'config, B':<34}" + "".join(f"{n:>19}" for n in ("copy", "torch", "inductor", "triton")))
    for name, (kk, pp, mpp) in configs.items():
        for b in batches:
            src = torch.randn(b, vocab, device="cuda") * 3
            work = torch.empty_like(src)
            k = torch.full((b,), kk, device="cuda", dtype=torch.int64) if kk else None
            p = torch.full((b,), pp, device="cuda") if pp else None
            mp = torch.full((b,), mpp, device="cuda") if mpp else None
            cols = [_time(lambda: work.copy_(src)),
                    _time(lambda: ref(work.copy_(src), k, p, mp, kk)),
                    _safe_time(lambda: compiled(work.copy_(src), k, p, mp, kk)),
                    _time(lambda: top_k_top_p_min_p_triton(work.copy_(src), k, p, mp))]
            print(_row(f"{name}, B={b}", cols))

    print("\nTriton variants (top_k=50 top_p=0.9), graph us incl. copy: block/npiv/warps")
    variants = [(1024, 16, 8), (1024, 8, 8), (1024, 32, 8), (1024, 16, 4), (1024, 16, 16), (2048, 16, 16), (512, 16, 4)]
    print(f"{'B':<8}" + "".join(f"{f'{bl}/{n}/{w}':>14}" for bl, n, w in variants))
    for b in ((1, 256) if quick else (1, 16, 64, 256)):
        src = torch.randn(b, vocab, device="cuda") * 3
        work = torch.empty_like(src)
        k = torch.full((b,), 50, device="cuda", dtype=torch.int64)
        p = torch.full((b,), 0.9, device="cuda")
        res = []
        for bl, n, w in variants:
            res.append(_time(lambda: top_k_top_p_min_p_triton(work.copy_(src), k, p, None, block=bl, npiv=n,
                                                              num_warps=w), eager_iters=10, repeats=3)[1])
        print(f"{b:<8}" + "".join(f"{r:>14.1f}" for r in res))


def bench_random_sample(quick: bool) -> None:
    """Temperature-only random sampling (T1): the Sampler's torch path vs the inverse-CDF kernel. (The one-pass
    exponential-race kernel it replaced measured 15.7 / 44.2 / 151.8 us at B = 1 / 64 / 256, docs/PERF.md.)"""
    from vllm_lite.kernels.cdf_sample import cdf_sample_triton
    from vllm_lite.sample.topk_topp import random_sample
    vocab = 151936

    def torch_path(x, t):  # what the Sampler ran before the kernel: float32 copy, /T, softmax, exponential race
        y = x.to(torch.float32).div_(t.unsqueeze(1))
        return random_sample(y.softmax(dim=-1), {})

    print(f"\nTemperature-only sampling, bf16 logits [B, {vocab}]; us (eager / graph)")
    print(f"{'B':<34}" + "".join(f"{n:>19}" for n in ("torch path", "triton cdf")))
    for b in ((1, 64, 256) if quick else (1, 8, 64, 128, 256)):
        x = (torch.randn(b, vocab, device="cuda") * 3).to(torch.bfloat16)
        t = torch.ones(b, device="cuda")
        greedy = torch.zeros(b, dtype=torch.bool, device="cuda")
        print(_row(f"B={b}", [_time(lambda: torch_path(x, t)),
                              _time(lambda: cdf_sample_triton(x, t, greedy, seed=1))]))

    variants = [(4096, 8), (4096, 4), (2048, 4), (2048, 8), (8192, 8), (8192, 16), (1024, 4)]
    print("\nTriton inverse-CDF variants, graph us: chunk/warps")
    print(f"{'B':<8}" + "".join(f"{f'{c}/{w}':>14}" for c, w in variants))
    for b in (1, 64, 256):
        x = (torch.randn(b, vocab, device="cuda") * 3).to(torch.bfloat16)
        t = torch.ones(b, device="cuda")
        greedy = torch.zeros(b, dtype=torch.bool, device="cuda")
        res = [_time(lambda: cdf_sample_triton(x, t, greedy, seed=1, chunk=c, num_warps=w))[1] for c, w in variants]
        print(f"{b:<8}" + "".join(f"{r:14.1f}" for r in res))


def _projection_weights() -> tuple[list[tuple[int, int]], list[list[torch.Tensor]], int]:
    """qwen3-0.6b's projection weights (qkv, o, gate_up, down) x 28 layers, bf16, distinct so nothing stays in L2:
    (shapes [N, K], weights per layer, bytes)."""
    hidden, q_size, kv_size, inter, layers = 1024, 2048, 1024, 3072, 28
    shapes = [(q_size + 2 * kv_size, hidden), (hidden, q_size), (2 * inter, hidden), (hidden, inter)]
    weights = [[torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for n, k in shapes]
               for _ in range(layers)]
    return shapes, weights, sum(w.numel() * 2 for layer in weights for w in layer)


def _projection_step(fn, xs: list[torch.Tensor], weights: list[list[torch.Tensor]]):
    """One decode step's projections through fn(x, w)."""
    def step() -> None:
        for layer in weights:
            for x, w in zip(xs, layer):
                fn(x, w)
    return step


def bench_gemm(quick: bool) -> None:
    """A step's projection GEMMs (`_projection_weights`) per BLAS backend, as in the model: bf16 F.linear."""
    import torch.nn.functional as F
    shapes, weights, nbytes = _projection_weights()
    flops_per_token = 2 * nbytes / 2
    backends = ["cublas", "cublaslt"]
    print(f"\nProjection GEMMs of one qwen3-0.6b step ({nbytes / 1e6:.0f} MB of weights), graph us per step "
          f"(TB/s of weights, TFLOP/s)")
    print(f"{'M':<8}" + "".join(f"{b:>28}" for b in backends))
    for m in ((1, 16, 64, 256, 8192) if quick else (1, 8, 16, 32, 64, 128, 256, 512, 8192)):
        xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _, k in shapes]
        cols = []
        for backend in backends:
            torch.backends.cuda.preferred_blas_library(backend)
            us = _time(_projection_step(F.linear, xs, weights), eager_iters=3, graph_calls=1, repeats=5)[1]
            cols.append(f"{us:.0f} ({nbytes / us / 1e6:.2f}, {flops_per_token * m / us / 1e6:.0f})")
        torch.backends.cuda.preferred_blas_library("cublas")
        print(f"{m:<8}" + "".join(f"{c:>28}" for c in cols))


def bench_skinny(quick: bool) -> None:
    """kernels/skinny_gemm.py against cuBLAS on the same step of projection GEMMs, M <= 16 (decode batches)."""
    import torch.nn.functional as F

    from vllm_lite.kernels.skinny_gemm import skinny_gemm_triton
    shapes, weights, nbytes = _projection_weights()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    variants = {"cublas": lambda x, w: F.linear(x, w)}
    for warps in (4, 8):
        variants[f"mac w{warps}"] = lambda x, w, nw=warps: skinny_gemm_triton(x, w, num_warps=nw, num_sms=sms)
    variants["mac bn8 bk512"] = lambda x, w: skinny_gemm_triton(x, w, block_n=8, block_k=512, num_sms=sms)
    variants["mac bn16 w8"] = lambda x, w: skinny_gemm_triton(x, w, block_n=16, num_warps=8, num_sms=sms)
    variants["dot bk256"] = lambda x, w: skinny_gemm_triton(x, w, num_sms=sms, use_dot=True, block_k=256)
    variants["dot bk512"] = lambda x, w: skinny_gemm_triton(x, w, num_sms=sms, use_dot=True, block_k=512)
    variants["dot bk256 s4"] = lambda x, w: skinny_gemm_triton(x, w, num_sms=sms, use_dot=True, block_k=256,
                                                                  num_stages=4)
    variants["dot bk256 w8"] = lambda x, w: skinny_gemm_triton(x, w, num_sms=sms, use_dot=True, block_k=256,
                                                                  num_warps=8)
    print(f"\nDecode-sized GEMMs of one qwen3-0.6b step ({nbytes / 1e6:.0f} MB), graph us per step (TB/s of weights)")
    print(f"{'M':<6}" + "".join(f"{name:>15}" for name in variants))
    for m in (1, 2, 4, 8, 16):
        xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _, k in shapes]
        errs = [float((skinny_gemm_triton(x, w, num_sms=sms).float() - F.linear(x, w).float()).abs().max())
                for x, w in zip(xs, weights[0])]
        cols = []
        for fn in variants.values():
            us = _safe_time(_projection_step(fn, xs, weights), eager_iters=3, graph_calls=1, repeats=5)[1]
            cols.append(f"{us:.0f} ({nbytes / us / 1e6:.2f})")
        print(f"{m:<6}" + "".join(f"{c:>15}" for c in cols) + f"   max |triton - cublas| {max(errs):.2e}")


def bench_rows_attention(quick: bool) -> None:
    """kernels/paged_rows_attention.py (an EAGLE proposal's attention) with one walk per (row, kv head) against the
    split keys split_count picks, for the default model's heads (9 q / 3 kv, D 64) and llama-3.1-8b's (32 / 8,
    D 128), block table of a 8,192-token context, rows at one context length each."""
    from vllm_lite.kernels.paged_rows_attention import rows_attention_torch, rows_attention_triton, split_count
    print("\nrows attention (per-row paged), graph us per call: one walk | split keys (splits) | torch reference")
    for name, hq, hkv, d in (("smollm2-135m", 9, 3, 64), ("llama-3.1-8b", 32, 8, 128)):
        bs, max_len = 16, 8192
        nblocks = max_len // bs
        cache = torch.randn(nblocks + 1, 2, bs, hkv, d, device="cuda", dtype=torch.bfloat16)
        for rows in (1, 4) if quick else (1, 2, 4, 8, 32):
            table = torch.randperm(nblocks + 1, device="cuda")[:nblocks].int().reshape(1, nblocks)
            row_req = torch.zeros(rows, dtype=torch.int32, device="cuda")
            q = torch.randn(rows, hq, d, device="cuda", dtype=torch.bfloat16)
            for ctx in (256, 1024) if quick else (256, 512, 1024, 4096):
                pos = torch.full((rows,), ctx - 1, device="cuda", dtype=torch.int64)
                sp = split_count(rows, hkv, max_len, 32 if d == 64 else 16)
                one = _safe_time(lambda: rows_attention_triton(q, cache, table, row_req, pos, 0.1, splits=1))[1]
                split = _safe_time(lambda: rows_attention_triton(q, cache, table, row_req, pos, 0.1))[1]
                ref = _safe_time(lambda: rows_attention_torch(q, cache, table, row_req, pos, 0.1))[1]
                err = float((rows_attention_triton(q, cache, table, row_req, pos, 0.1).float()
                             - rows_attention_torch(q, cache, table, row_req, pos, 0.1).float()).abs().max())
                print(f"{name:<14} rows {rows:<3} ctx {ctx:<5} {one:>8.1f} | {split:>8.1f} ({sp:>2}) | {ref:>8.1f}"
                      f"   max err {err:.1e}")


BENCHES = {"kv": bench_kv_write, "qk": bench_qk_norm_rope, "sampling": bench_sampling, "random": bench_random_sample,
           "gemm": bench_gemm, "skinny": bench_skinny, "rows": bench_rows_attention}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer sizes")
    ap.add_argument("--only", choices=list(BENCHES), default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/kernel_bench.py needs CUDA")
    torch._dynamo.config.cache_size_limit = 64
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", end="")
    import triton
    print(f"  triton {triton.__version__}")
    for name, bench in BENCHES.items():
        if args.only in (None, name):
            bench(args.quick)


if __name__ == "__main__":
    main()
