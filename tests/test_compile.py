"""compile/: the opaque attention op, torch.compile of the tiny models (no graph breaks, compiled == eager on a mixed
batch, one graph for every token count, the on-disk cache) and the CUDA-graph runner's size logic (CPU parts)."""
import os

import pytest
import torch
from torch._dynamo.utils import counters

from vllm_lite.attention import AttentionContext, StepMetadata, TorchAttentionBackend
from vllm_lite.compile import CUDAGraphRunner, compile_model, default_capture_sizes
from vllm_lite.compile.cuda_graphs import PREFILL, prefill_capture_sizes, prefill_key, prefill_slot_counts
from vllm_lite.compile.custom_ops import get_context, register_context
from vllm_lite.config import DeviceConfig, EngineConfig, LoadConfig, ModelConfig
from vllm_lite.model_loader import load_model, resolve_model

BLOCK = 4


def _load(path):
    info = resolve_model(ModelConfig(model=path), LoadConfig(), device="cpu")
    ctx = AttentionContext(TorchAttentionBackend())
    model = load_model(info, LoadConfig(), "cpu", ctx)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    shape = ctx.backend.kv_cache_shape(64, BLOCK, cfg.num_key_value_heads, head_dim)
    ctx.kv_caches = [torch.zeros(shape) for _ in range(cfg.num_hidden_layers)]
    return model, ctx


def _step(reqs):
    """reqs: [(first block, prefix_len, query_len)] -> (StepMetadata, positions). Request i owns blocks
    first, first+1, ... (enough for 64 tokens)."""
    qlens = [q for _, _, q in reqs]
    seq_lens = [p + q for _, p, q in reqs]
    qsl = torch.tensor([0] + torch.cumsum(torch.tensor(qlens), 0).tolist(), dtype=torch.int32)
    table = torch.tensor([list(range(b, b + 16)) for b, _, _ in reqs], dtype=torch.int32)
    pos = torch.cat([torch.arange(p, p + q) for _, p, q in reqs])
    row = torch.repeat_interleave(torch.arange(len(reqs)), torch.tensor(qlens))
    slots = table[row, pos // BLOCK].long() * BLOCK + pos % BLOCK
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    meta = StepMetadata(len(reqs), int(qsl[-1]), qsl, lens, table, slots, qsl, lens, max(qlens), max(seq_lens), BLOCK)
    return meta, pos


def _run(forward, model, ctx, reqs, seed, packed=False):
    meta, pos = _step(reqs)
    ids = torch.randint(0, model.config.vocab_size, (meta.num_tokens,), generator=torch.Generator().manual_seed(seed))
    if packed:  # views into one buffer at non-zero offsets, as the model runner's input stager hands them over
        n = meta.num_tokens
        buf = torch.zeros(64 + 2 * n, dtype=ids.dtype)
        buf[16: 16 + n], buf[48 + n: 48 + 2 * n] = ids, pos
        ids, pos = buf[16: 16 + n], buf[48 + n: 48 + 2 * n]
    ctx.set_step(meta)
    with torch.inference_mode():
        return model.compute_logits(forward(ids, pos))


def test_attention_op_registered_and_opaque(tiny_qwen3_path):
    model, ctx = _load(tiny_qwen3_path)
    attn = model.model.layers[1].self_attn.attn
    assert get_context(attn.ctx_id) is ctx and register_context(ctx) == attn.ctx_id
    meta, _ = _step([(0, 0, 3), (16, 0, 2)])
    ctx.set_step(meta)
    qkv = torch.randn(5, (4 + 2 + 2) * 16)
    q, k, v = qkv[:, :64], qkv[:, 64:96], qkv[:, 96:]  # views of a fused projection, as the model passes them
    cos, sin = torch.randn(5, 8), torch.randn(5, 8)
    qw, kw = torch.randn(16), torch.randn(16)
    args = (q, k, v, cos, sin, qw, kw, 1e-6, attn.ctx_id, 1)
    torch.library.opcheck(torch.ops.vllm_lite.attention.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    out = torch.ops.vllm_lite.attention(*args)
    # = q/k RMSNorm + rotary (reference), then the backend's write + attend
    from vllm_lite.kernels.qk_norm_rope import qk_norm_rope_torch
    qr, kr = qk_norm_rope_torch(q, k, cos, sin, qw, kw, 1e-6, 16)
    want = ctx.backend.forward(qr.view(5, 4, 16), kr.view(5, 2, 16), v.reshape(5, 2, 16), ctx.kv_caches[1],
                               attn.spec, ctx.metadata)
    torch.testing.assert_close(out, want.reshape(5, 64))
    # The KV write happened inside the op: token 4 is the second token of the request whose block is 16.
    assert torch.equal(ctx.kv_caches[1][16, 0, 1], kr.view(5, 2, 16)[4])
    assert torch.equal(ctx.kv_caches[1][16, 1, 1], v.reshape(5, 2, 16)[4])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_no_graph_breaks(request, arch):
    model, ctx = _load(request.getfixturevalue(f"tiny_{arch}_path"))
    meta, pos = _step([(0, 0, 6), (16, 0, 1)])
    ctx.set_step(meta)
    ids = torch.randint(0, 300, (7,))
    with torch.inference_mode():
        explained = torch._dynamo.explain(model.forward)(ids, pos)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1
        fwd = compile_model(model, None, backend="eager")  # fullgraph=True: a break would raise here
        torch.testing.assert_close(fwd(ids, pos), model(ids, pos))


def test_compiled_matches_eager_one_graph_and_cache(tiny_qwen3_path, tmp_path, monkeypatch):
    for var in ("TORCHINDUCTOR_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE"):
        monkeypatch.setenv(var, os.environ.get(var, ""))  # restored after the test
    model, ctx = _load(tiny_qwen3_path)
    torch._dynamo.reset()
    counters.clear()
    fwd = compile_model(model, EngineConfig(), cache_dir=str(tmp_path / "cache"))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache")
    # Step 1: two fresh prefills. Step 2 (mixed): a decode, a chunk after a cached prefix, a new prompt.
    step1, step2 = [(0, 0, 9), (16, 0, 5)], [(0, 9, 1), (16, 5, 4), (32, 0, 7)]
    saved = [c.clone() for c in ctx.kv_caches]
    want1, want2 = _run(model.forward, model, ctx, step1, 1), _run(model.forward, model, ctx, step2, 2)
    ctx.kv_caches = [c.clone() for c in saved]
    got1, got2 = _run(fwd, model, ctx, step1, 1), _run(fwd, model, ctx, step2, 2)
    torch.testing.assert_close(got1, want1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got2, want2, atol=1e-5, rtol=1e-5)
    for n in (1, 2, 7, 33):  # decode-sized and odd sizes: no recompilation (no 0/1 specialisation)
        reqs = [(16 * i, 0, 1) for i in range(n)] if n <= 4 else [(0, 0, n)]
        ctx.kv_caches = [c.clone() for c in saved]
        want = _run(model.forward, model, ctx, reqs, n)
        ctx.kv_caches = [c.clone() for c in saved]
        got = _run(fwd, model, ctx, reqs, n, packed=n % 2 == 1)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # Neither sizes nor storage offsets of the inputs recompile.
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert fwd.compile_seconds > 0 and fwd.num_calls == 6
    # A second start (fresh Dynamo state, same cache dir) loads the compiled graph from the on-disk cache.
    assert counters["inductor"]["fxgraph_cache_miss"] >= 1
    torch._dynamo.reset()
    counters.clear()
    fwd2 = compile_model(model, EngineConfig(), cache_dir=str(tmp_path / "cache"))
    ctx.kv_caches = [c.clone() for c in saved]
    torch.testing.assert_close(_run(fwd2, model, ctx, step1, 1), want1, atol=1e-5, rtol=1e-5)
    hits = counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]
    assert hits >= 1 and counters["inductor"]["fxgraph_cache_miss"] == 0, (dict(counters["inductor"]),
                                                                          dict(counters["aot_autograd"]))
    torch._dynamo.reset()


def test_enforce_eager_returns_plain_forward(tiny_llama_path):
    model, _ = _load(tiny_llama_path)
    fwd = compile_model(model, EngineConfig(device=DeviceConfig(enforce_eager=True)))
    assert fwd == model.forward


def test_capture_sizes_and_padding():
    assert default_capture_sizes(256) == [1, 2, 4, 8] + list(range(16, 257, 8))
    assert default_capture_sizes(1000)[-1] == 512 and default_capture_sizes(1000, max_capture_size=64)[-1] == 64
    assert default_capture_sizes(5) == [1, 2, 4, 8]  # every batch up to max_num_seqs has a graph
    assert default_capture_sizes(250)[-2:] == [248, 256]
    runner = CUDAGraphRunner(lambda i, p: None, default_capture_sizes(40), 40, "cpu", 64, torch.float32)
    assert runner.sizes == [1, 2, 4, 8, 16, 24, 32, 40] and runner.input_ids.shape == (40,)
    assert [runner.padded_size(n) for n in (1, 2, 3, 5, 9, 17, 40)] == [1, 2, 4, 8, 16, 24, 40]
    assert not runner.can_run(1)  # nothing captured
    with pytest.raises(ValueError, match="no CUDA graph for 41 tokens"):
        runner.padded_size(41)
    with pytest.raises(RuntimeError, match="CUDA"):
        runner.capture(lambda num_tokens, query_len, slots: None)
    # Verification steps of 1 + 3 tokens per request: graphs of 4 tokens per request, sizes in multiples of 4.
    spec = CUDAGraphRunner(lambda i, p: None, [1, 2, 4, 8], 8, "cpu", 64, torch.float32, query_lens=(1, 4))
    assert spec.token_sizes == {1: [1, 2, 4, 8], 4: [4, 8, 16, 32]} and spec.input_ids.shape == (32,)
    assert [spec.padded_size(n, 4) for n in (4, 8, 12, 32)] == [4, 8, 16, 32] and spec.padded_size(3) == 4
    with pytest.raises(ValueError, match="of 2 per request"):
        spec.padded_size(4, 2)
    # Prefill graphs: the next size strictly above (the last padding request needs a token).
    assert prefill_capture_sizes(512) == [16, 32, 64, 96, 128, 192, 256, 384, 512]
    assert prefill_capture_sizes(40) == [16, 32] and prefill_slot_counts(1) == [1]
    assert prefill_slot_counts(5) == [1, 2, 4, 8] and prefill_slot_counts(16) == [1, 2, 4, 8, 16]
    pre = CUDAGraphRunner(lambda i, p: None, [1, 2], 2, "cpu", 64, torch.float32, prefill_sizes=[16, 32, 64])
    assert pre.token_sizes == {1: [1, 2], PREFILL: [16, 32, 64]} and pre.input_ids.shape == (64,)
    assert [pre.padded_size(n, PREFILL) for n in (1, 15, 16, 63)] == [16, 16, 32, 64]
    with pytest.raises(ValueError, match="no CUDA graph for 64 tokens"):
        pre.padded_size(64, PREFILL)
    pre.graphs[1, 1] = object()  # as if captured: which graph a step replays
    assert pre.graph_for(1, 1, 1) == (1, 1) and pre.graph_for(2, 2, 1) == (1, 2)
    assert pre.graph_for(1, 40, 40) == (PREFILL, 64) and pre.graph_for(1, 64, 64) is None
    assert pre.graph_for(2, 7, 4) is None and pre.graph_for(3, 3, 1) is None  # one request slot only
    # With 1, 2 and 4 request slots: the fewest slots that hold the step, counting one-token dummies for the rest.
    mixed = CUDAGraphRunner(lambda i, p: None, [1, 2], 2, "cpu", 64, torch.float32, prefill_sizes=[2, 4, 16, 32],
                            prefill_slots=[1, 2, 4])
    assert mixed.token_sizes == {1: [1, 2], -1: [2, 4, 16, 32], -2: [4, 16, 32], -4: [16, 32]}
    assert prefill_key(4) == -4
    mixed.graphs[1, 1] = object()
    assert mixed.graph_for(2, 7, 4) == (-2, 16) and mixed.graph_for(3, 20, 18) == (-4, 32)  # 20 + 1 dummy -> 32
    assert mixed.graph_for(3, 3, 1) == (-4, 16) and mixed.graph_for(2, 2, 1) == (1, 2)  # uniform decode first
    assert mixed.graph_for(3, 30, 28) == (-4, 32) and mixed.graph_for(3, 31, 29) is None  # 31 + 1 + 1 > 31
    assert mixed.graph_for(5, 9, 5) is None  # more requests than slots
    wide = CUDAGraphRunner(lambda i, p: None, [1], 1, "cpu", 64, torch.float32, prefill_sizes=[16, 32],
                           prefill_slots=[1, 64])  # no size holds 64 slots: no graphs for them
    assert sorted(wide.token_sizes) == [-1, 1] and wide.input_ids.shape == (32,)


@pytest.mark.parametrize("kwargs", [{}, {"prefill_graph_requests": 1}, {"max_num_seqs": 4},
                                    {"max_prefill_graph_tokens": 0}, {"speculative": 3}])
def test_step_shapes_name_the_captured_graphs(kwargs):
    """The KV-cache budget reserves each graph's output and attention state from the step shapes' graph sizes: they
    are the graphs a CUDAGraphRunner built from those shapes captures (the default: 16 request slots)."""
    from vllm_lite.config import EngineConfig
    from vllm_lite.worker.step_shapes import step_shapes
    kwargs = dict(kwargs)
    k = kwargs.pop("speculative", 0)
    shapes = step_shapes(EngineConfig.from_kwargs(device="cpu", **kwargs), k, 16)
    runner = CUDAGraphRunner(lambda i, p: None, shapes.capture_sizes, max(shapes.capture_sizes), "cpu", 64,
                             torch.float32, query_lens=shapes.graph_query_lens, prefill_sizes=shapes.prefill_sizes,
                             prefill_slots=shapes.prefill_slots)
    assert shapes.graph_token_sizes() == runner.token_sizes
    if not kwargs and not k:
        assert shapes.prefill_slots == [1, 2, 4, 8, 16] and len(shapes.prefill_sizes) == 9


def test_engine_with_compiled_forward_matches_eager_and_never_recompiles(tiny_llama_path, tmp_path):
    """The whole engine (packed step inputs at non-zero offsets, prefills and decodes of many sizes, async
    scheduling) through the inductor-compiled forward: same greedy tokens as eager, one graph, no recompilation.
    Llama has no q/k norm, so the attention op gets None weights."""
    from vllm_lite import LLM, SamplingParams
    llm = LLM(tiny_llama_path, device="cpu", dtype="float32", max_model_len=256)
    runner = llm.engine.executor.worker.runner
    prompts = ["Hello world", "The quick brown fox jumps over", "1 2 3"]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    eager = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    torch._dynamo.reset()
    runner.forward = compile_model(runner.model, llm.config, cache_dir=str(tmp_path / "cache"))
    compiled = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert compiled == eager
    assert runner.forward.num_calls > 10 and runner.forward.num_recompiles == 0
    torch._dynamo.reset()


def test_skinny_linear_op_compiles_without_breaks(tiny_qwen3_path, monkeypatch):
    """Projections go through the opaque `vllm_lite::skinny_linear` op on CUDA (the Triton kernel where it measured
    faster, F.linear otherwise): valid schema / fake impl, no graph breaks, same outputs (routed here on CPU)."""
    from vllm_lite.models.decoder import Linear
    w, x = torch.randn(24, 16), torch.randn(3, 16)
    torch.library.opcheck(torch.ops.vllm_lite.skinny_linear.default, (x, w, None),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    torch.testing.assert_close(torch.ops.vllm_lite.skinny_linear(x, w, torch.ones(24)), x @ w.t() + 1)
    model, ctx = _load(tiny_qwen3_path)
    meta, pos = _step([(0, 0, 6), (16, 0, 1)])
    ctx.set_step(meta)
    ids = torch.randint(0, 300, (7,))
    with torch.inference_mode():
        want = model(ids, pos)
        monkeypatch.setattr(Linear, "skinny_devices", ("cuda", "cpu"))
        explained = torch._dynamo.explain(model.forward)(ids, pos)
        assert explained.graph_break_count == 0, explained.break_reasons
        targets = {str(n.target) for g in explained.graphs for n in g.graph.nodes}
        assert any("skinny_linear" in t for t in targets), targets
        torch.testing.assert_close(compile_model(model, None, backend="eager")(ids, pos), want)


def test_many_model_instances_do_not_share_one_dynamo_cache():
    """Ten instances of one model class with different shapes (a target and its draft model, engines built one after
    another), each compiled (fullgraph): Dynamo's per-code-object limit (8) fails the ninth if they share the
    forward's code object."""
    from vllm_lite.compile.compiler import CompiledForward

    class Tiny(torch.nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.full((width,), float(width)))

        def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            return (input_ids + positions).float()[:, None] * self.weight

    torch._dynamo.reset()
    ids, pos = torch.arange(6), torch.arange(6)
    models = [Tiny(i + 1) for i in range(10)]
    forwards = [CompiledForward(m.forward, backend="eager") for m in models]
    for m, fwd in zip(models, forwards):
        torch.testing.assert_close(fwd(ids, pos), m(ids, pos))
    torch._dynamo.reset()


@pytest.mark.slow
def test_cpp_wrapper_compiled_matches_eager(tiny_qwen3_path, tmp_path, monkeypatch):
    """--inductor-cpp-wrapper: the forward compiled with inductor's C++ wrapper (the opaque attention op called from
    C++) equals eager on prefills and a mixed step, with one graph for every token count (~20 s: a C++ build)."""
    for var in ("TORCHINDUCTOR_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE"):
        monkeypatch.setenv(var, os.environ.get(var, ""))
    model, ctx = _load(tiny_qwen3_path)
    torch._dynamo.reset()
    counters.clear()
    config = EngineConfig.from_kwargs(inductor_cpp_wrapper=True)
    fwd = compile_model(model, config, cache_dir=str(tmp_path / "cache"))
    saved = [c.clone() for c in ctx.kv_caches]
    steps = [[(0, 0, 9), (16, 0, 5)], [(0, 9, 1), (16, 5, 4), (32, 0, 7)], [(0, 0, 3)]]
    want = []
    for i, reqs in enumerate(steps):
        want.append(_run(model.forward, model, ctx, reqs, i + 1))
    ctx.kv_caches = [c.clone() for c in saved]
    for i, reqs in enumerate(steps):
        torch.testing.assert_close(_run(fwd, model, ctx, reqs, i + 1), want[i], atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1 and fwd.num_recompiles == 0
    torch._dynamo.reset()
