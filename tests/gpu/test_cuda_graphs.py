"""CUDA-graph decode (compile/cuda_graphs.py) on a tiny model: capture sizes 1, 2, 4, 8 sharing one pool, then
replay padded decode batches and compare logits and the KV cache with eager steps.

Two attention backends:
- `static-torch`: a graph-safe pure-decode variant of the torch reference backend defined here (its decode metadata
  lives in static buffers refilled by `prepare(meta, graph_batch_size)`; prefill steps use the reference path), so
  the runner is tested on any CUDA machine, eager and torch.compile'd;
- `flashinfer`: the real backend (vllm_lite/attention/flashinfer_backend.py) built through the selector, in bf16
  (skipped without flashinfer).
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from vllm_lite.attention import AttentionContext, StepMetadata, TorchAttentionBackend
from vllm_lite.attention.torch_backend import _sdpa
from vllm_lite.compile import CUDAGraphRunner, compile_model
from vllm_lite.compile.cuda_graphs import PREFILL
from vllm_lite.config import LoadConfig, ModelConfig
from vllm_lite.model_loader import load_model, resolve_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

BLOCK = 16
MAX_BLOCKS = 4  # per request (64 tokens)
SIZES = [1, 2, 4, 8]
DEV = torch.device("cuda")


@dataclass
class StaticDecodeMeta:
    batch_size: int
    slot_mapping: torch.Tensor  # the runner's static slot buffer (at capture); -1 = padding row


class StaticDecodeTorchBackend(TorchAttentionBackend):
    """Torch reference attention whose pure-decode path is CUDA-graph-safe, with FlashInfer's graph contract:
    `prepare(meta, graph_batch_size)` refills static block-table / seq-len buffers; padding requests attend to
    block 0 with seq_len 1; padding rows (slot -1) write into block 0 (a scratch block in this test)."""
    name = "static-torch"

    def __init__(self, max_bs: int) -> None:
        self.block_table = torch.zeros((max_bs, MAX_BLOCKS), dtype=torch.long, device=DEV)
        self.seq_lens = torch.ones(max_bs, dtype=torch.long, device=DEV)

    def prepare(self, meta: StepMetadata, graph_batch_size: int | None = None):
        if graph_batch_size is None:
            return super().prepare(meta)
        assert meta.is_pure_decode and meta.num_reqs <= graph_batch_size
        n, nb = meta.num_reqs, meta.block_table.shape[1]
        self.block_table.zero_()
        self.block_table[:n, :nb].copy_(meta.block_table[:n])
        self.seq_lens.fill_(1)
        self.seq_lens[:n].copy_(meta.seq_lens[:n])
        return StaticDecodeMeta(graph_batch_size, meta.slot_mapping)

    def forward(self, q, k, v, kv_cache, spec, meta):
        if not isinstance(meta, StaticDecodeMeta):
            return super().forward(q, k, v, kv_cache, spec, meta)
        bs = meta.batch_size
        assert q.shape[0] == bs
        slots = meta.slot_mapping[:bs]
        slots = torch.where(slots >= 0, slots, torch.zeros_like(slots))
        blk, off = slots // BLOCK, slots % BLOCK
        kv_cache[blk, 0, off] = k.to(kv_cache.dtype)
        kv_cache[blk, 1, off] = v.to(kv_cache.dtype)
        kv = kv_cache[self.block_table[:bs]]  # [bs, MAX_BLOCKS, 2, BLOCK, Hkv, D]
        keys = kv[:, :, 0].reshape(bs, -1, spec.num_kv_heads, spec.head_dim).transpose(1, 2)
        vals = kv[:, :, 1].reshape(bs, -1, spec.num_kv_heads, spec.head_dim).transpose(1, 2)
        mask = torch.arange(MAX_BLOCKS * BLOCK, device=q.device)[None, :] < self.seq_lens[:bs, None]
        return _sdpa(q[:, :, None, :], keys, vals, mask[:, None, None, :], spec)[:, :, 0, :]


def _meta(reqs) -> StepMetadata:
    """reqs: [(first block, prefix_len, query_len)]; request i owns blocks first .. first + MAX_BLOCKS - 1."""
    qlens = [q for _, _, q in reqs]
    seq_lens = [p + q for _, p, q in reqs]
    qsl = torch.tensor([0] + torch.cumsum(torch.tensor(qlens), 0).tolist(), dtype=torch.int32)
    table = torch.tensor([list(range(b, b + MAX_BLOCKS)) for b, _, _ in reqs], dtype=torch.int32)
    pos = torch.cat([torch.arange(p, p + q) for _, p, q in reqs])
    row = torch.repeat_interleave(torch.arange(len(reqs)), torch.tensor(qlens))
    slots = table[row, pos // BLOCK].long() * BLOCK + pos % BLOCK
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return StepMetadata(len(reqs), int(qsl[-1]), qsl.to(DEV), lens.to(DEV), table.to(DEV), slots.to(DEV), qsl, lens,
                        max(qlens), max(seq_lens), BLOCK)


def _positions(reqs) -> torch.Tensor:
    return torch.cat([torch.arange(p, p + q) for _, p, q in reqs]).to(DEV, torch.int32)


def _setup(path, backend_name, dtype):
    info = resolve_model(ModelConfig(model=path, dtype=dtype), LoadConfig(), device="cuda")
    cfg = info.hf_config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if backend_name == "static-torch":
        backend = StaticDecodeTorchBackend(max(SIZES))
    else:
        pytest.importorskip("flashinfer")
        from vllm_lite.attention.selector import make_backend

        try:
            backend = make_backend("flashinfer", num_heads=cfg.num_attention_heads,
                                   num_kv_heads=cfg.num_key_value_heads, head_dim=head_dim, scale=head_dim ** -0.5,
                                   dtype=info.dtype, device=DEV, max_num_seqs=max(SIZES),
                                   max_blocks_per_seq=MAX_BLOCKS)
        except (ValueError, ImportError) as exc:
            pytest.skip(f"flashinfer backend not available: {exc}")
    ctx = AttentionContext(backend)
    model = load_model(info, LoadConfig(), DEV, ctx)
    num_blocks = max(SIZES) * MAX_BLOCKS + 1  # block 0: scratch for padding rows; request i owns 1 + 4i ..
    shape = backend.kv_cache_shape(num_blocks, BLOCK, cfg.num_key_value_heads, head_dim)
    ctx.kv_caches = [torch.zeros(shape, dtype=info.dtype, device=DEV) for _ in range(cfg.num_hidden_layers)]
    return model, ctx, backend


@pytest.mark.parametrize("backend_name,dtype,compiled", [
    ("static-torch", "float32", False),
    ("static-torch", "float32", True),
    ("flashinfer", "bfloat16", True),
])
def test_graph_decode_matches_eager(tiny_model_factory, tmp_path, backend_name, dtype, compiled):
    path = tiny_model_factory("qwen3", head_dim=64)  # GQA 4/2, head_dim 64: a FlashInfer shape
    model, ctx, backend = _setup(path, backend_name, dtype)
    fwd = compile_model(model, None, cache_dir=str(tmp_path / "cache")) if compiled else model.forward
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == "float32" else dict(atol=1e-1, rtol=5e-2)
    gen = torch.Generator().manual_seed(0)
    prompt_lens = [5, 9, 3, 12, 7, 1, 4, 10]
    first = [1 + i * MAX_BLOCKS for i in range(len(prompt_lens))]

    with torch.inference_mode():
        # Prefill every sequence (eager path of the backend); this also compiles the forward.
        reqs = [(b, 0, n) for b, n in zip(first, prompt_lens)]
        ids = torch.randint(0, 300, (sum(prompt_lens),), generator=gen).to(DEV, torch.int32)
        ctx.set_step(_meta(reqs))
        hidden = fwd(ids, _positions(reqs))
        last = torch.tensor(prompt_lens).cumsum(0) - 1
        next_ids = model.compute_logits(hidden[last.to(DEV)]).argmax(-1).to(torch.int32)

        # Capture after the KV cache exists (graphs bake in its address); dummy decodes of seq_len 1 in block 0.
        runner = CUDAGraphRunner(fwd, SIZES, max(SIZES), DEV, model.config.hidden_size, model.lm_head.weight.dtype)

        def prepare_for_capture(num_tokens, query_len, slots):
            qsl = torch.arange(num_tokens + 1, dtype=torch.int32)
            ones = torch.ones(num_tokens, dtype=torch.int32)
            meta = StepMetadata(num_tokens, num_tokens, qsl.to(DEV), ones.to(DEV),
                                torch.zeros(num_tokens, 1, dtype=torch.int32, device=DEV), slots, qsl, ones, 1, 1,
                                BLOCK)
            ctx.metadata = backend.prepare(meta, graph_batch_size=num_tokens)

        runner.capture(prepare_for_capture)
        assert sorted(runner.graphs) == [(1, s) for s in SIZES] and runner.graph_pool_bytes >= 0
        for bs in SIZES:
            assert runner.outputs[1, bs].shape == (bs, model.config.hidden_size)

        lens = list(prompt_lens)
        for n in (8, 3, 1, 5, 2, 8):  # padded to 8, 4, 1, 8, 2, 8
            reqs = [(first[i], lens[i], 1) for i in range(n)]
            meta, pos, step_ids = _meta(reqs), _positions(reqs), next_ids[:n].clone()
            graph_caches = ctx.kv_caches
            # eager reference on a copy of the KV caches
            ctx.kv_caches = [c.clone() for c in graph_caches]
            ctx.set_step(meta)
            want = model.compute_logits(model.forward(step_ids, pos))
            eager_caches, ctx.kv_caches = ctx.kv_caches, graph_caches
            # graph replay on the captured caches
            assert runner.can_run(n)
            ctx.metadata = backend.prepare(meta, graph_batch_size=runner.padded_size(n))
            got = model.compute_logits(runner.run(step_ids, pos, n, slot_mapping=meta.slot_mapping))
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, **tol)
            assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= (1.0 if dtype == "float32" else 0.75)
            for g, e in zip(graph_caches, eager_caches):  # same KV written (block 0 is the padded rows' scratch)
                torch.testing.assert_close(g[1:], e[1:], **tol)
            for i in range(n):
                lens[i] += 1
            next_ids[:n] = want.argmax(-1).to(torch.int32)
        if compiled:
            assert fwd.num_calls >= 1
        runner.release()


def test_prefill_graph_matches_eager(tiny_model_factory, tmp_path):
    """Prefill graphs (FlashInfer, bf16, compiled) of 1 and 4 request slots: a request's L tokens (fresh, or after a
    cached prefix), and steps mixing a prompt with decodes, padded with one-token dummies and a last dummy request
    over block 0; logits of every row and the KV written match an eager step, and the padding writes nothing."""
    path = tiny_model_factory("qwen3", head_dim=64)
    model, ctx, backend = _setup(path, "flashinfer", "bfloat16")
    fwd = compile_model(model, None, cache_dir=str(tmp_path / "cache"))
    tol = dict(atol=1e-1, rtol=5e-2)
    gen = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        warm = [(1, 0, 3)]
        ctx.set_step(_meta(warm))
        fwd(torch.zeros(3, dtype=torch.int32, device=DEV), _positions(warm))  # compiles eagerly first
        runner = CUDAGraphRunner(fwd, [1], 1, DEV, model.config.hidden_size, model.lm_head.weight.dtype,
                                 prefill_sizes=[16, 32, 64], prefill_slots=[1, 4])

        def prepare_for_capture(num_tokens, key, slots):
            meta = StepMetadata.for_capture(-key if key < 0 else num_tokens, max(key, 1), slots, BLOCK)
            kwargs = {"prefill_slots": -key} if key < 0 else {}
            ctx.metadata = backend.prepare(meta, graph_batch_size=num_tokens, **kwargs)

        runner.capture(prepare_for_capture)
        assert sorted(runner.graphs) == sorted([(PREFILL, 16), (PREFILL, 32), (PREFILL, 64), (-4, 16), (-4, 32),
                                                (-4, 64), (1, 1)])
        assert not runner.can_run(64, PREFILL) and runner.can_run(63, PREFILL)
        # Steps as [(first block, cached prefix, new tokens)]: 5 -> 16, 16 -> 32 (the dummy needs a token), 9 after
        # 5 cached, 40 -> 64 (the dummy spans two pages of block 0); then a new prompt beside two decodes (4 slots:
        # one one-token dummy), and four decodes of different lengths that a decode graph of 4 would not hold here.
        steps = [[(1, 0, 5)], [(5, 0, 16)], [(9, 0, 5)], [(9, 5, 9)], [(13, 0, 40)],
                 [(1, 5, 1), (17, 0, 11), (9, 14, 1)], [(1, 6, 1), (17, 11, 1), (9, 15, 1), (5, 16, 1)]]
        want_keys = [PREFILL] * 5 + [-4, -4]
        for reqs, want_key in zip(steps, want_keys):
            for first, prefix, _ in reqs:
                if prefix == 0:
                    for c in ctx.kv_caches:
                        c[first: first + MAX_BLOCKS].zero_()
            n = sum(q for _, _, q in reqs)
            ids = torch.randint(0, 300, (n,), generator=gen).to(DEV, torch.int32)
            meta, pos = _meta(reqs), _positions(reqs)
            graph_caches = ctx.kv_caches
            ctx.kv_caches = [c.clone() for c in graph_caches]
            ctx.set_step(meta)
            want = model.compute_logits(model.forward(ids, pos))
            eager_caches, ctx.kv_caches = ctx.kv_caches, graph_caches
            key, size = runner.graph_for(len(reqs), n, meta.max_query_len)
            assert key == want_key
            ctx.metadata = backend.prepare(meta, graph_batch_size=size, prefill_slots=-key)
            got = model.compute_logits(runner.run(ids, pos, n, meta.slot_mapping, key, size))
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, **tol)
            assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.75
            for g, e in zip(graph_caches, eager_caches):
                torch.testing.assert_close(g, e, **tol)  # block 0 included: the padding writes nothing
                assert not g[0].any()
        assert runner.num_replays[PREFILL] == 5 and runner.num_replays[-4] == 2
        runner.release()
