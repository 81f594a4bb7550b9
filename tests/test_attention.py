"""The torch reference backend against plain causal attention over contiguous K/V, for mixed batches."""
import math

import pytest
import torch
import torch.nn.functional as F

from vllm_lite.attention import AttentionSpec, StepMetadata, TorchAttentionBackend
from vllm_lite.attention.torch_backend import write_kv_cache


def _reference(q, k, v, spec):
    """Causal attention of the last q.shape[0] positions over all of k/v (contiguous, [L, H, D])."""
    g = spec.num_heads // spec.num_kv_heads
    k = k.repeat_interleave(g, 1).transpose(0, 1)
    v = v.repeat_interleave(g, 1).transpose(0, 1)
    L, lq = k.shape[1], q.shape[0]
    mask = torch.ones(lq, L, dtype=torch.bool).tril(L - lq)
    return F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=mask, scale=spec.scale).transpose(0, 1)


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)])
def test_mixed_batch_matches_contiguous_attention(block_size, heads):
    torch.manual_seed(0)
    hq, hkv = heads
    d = 16
    spec = AttentionSpec(hq, hkv, d, 1 / math.sqrt(d))
    backend = TorchAttentionBackend()
    # (cached prefix length, new tokens): fresh prefill, chunk after a cached prefix, decodes.
    reqs = [(0, 7), (5, 6), (12, 1), (3, 1), (0, 1), (9, 4)]
    num_blocks = 64
    cache = torch.zeros(backend.kv_cache_shape(num_blocks, block_size, hkv, d))
    perm = torch.randperm(num_blocks).tolist()
    full_k, full_v, tables, slots, q_all, k_new, v_new = [], [], [], [], [], [], []
    for i, (prefix, new) in enumerate(reqs):
        total = prefix + new
        nblk = (total + block_size - 1) // block_size
        blocks = [perm.pop() for _ in range(nblk)]
        tables.append(blocks)
        k = torch.randn(total, hkv, d)
        v = torch.randn(total, hkv, d)
        full_k.append(k)
        full_v.append(v)
        pos_slots = torch.tensor([blocks[p // block_size] * block_size + p % block_size for p in range(total)])
        write_kv_cache(k[:prefix], v[:prefix], cache, pos_slots[:prefix], block_size)  # the cached prefix
        slots.append(pos_slots[prefix:])
        q_all.append(torch.randn(new, hq, d))
        k_new.append(k[prefix:])
        v_new.append(v[prefix:])
    max_blocks = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables], dtype=torch.int32)
    qlens = [n for _, n in reqs]
    qsl = torch.tensor([0] + list(torch.cumsum(torch.tensor(qlens), 0)), dtype=torch.int32)
    seq_lens = torch.tensor([p + n for p, n in reqs], dtype=torch.int32)
    meta = StepMetadata(len(reqs), int(qsl[-1]), qsl, seq_lens, bt, torch.cat(slots), qsl, seq_lens,
                        max(qlens), int(seq_lens.max()), block_size)
    out = backend.forward(torch.cat(q_all), torch.cat(k_new), torch.cat(v_new), cache, spec, backend.prepare(meta))
    for i in range(len(reqs)):
        ref = _reference(q_all[i], full_k[i], full_v[i], spec)
        torch.testing.assert_close(out[qsl[i]:qsl[i + 1]], ref, atol=1e-5, rtol=1e-5)


def test_make_backend_takes_kernel_choices_from_kernel_config(monkeypatch):
    """make_backend(kernels=KernelConfig): FlashInfer gets flashinfer_tensor_cores and kv_write_kernel at
    construction (a stand-in module here, so no GPU is needed); the torch backend is the reference and writes with
    the torch reference."""
    import sys
    import types

    from vllm_lite.attention import selector
    from vllm_lite.config import KernelConfig

    made = []

    class FakeFlashInfer:
        name = "flashinfer"

        def __init__(self, *args, use_tensor_cores=None, kv_write_kernel=True):
            made.append((use_tensor_cores, kv_write_kernel))

    monkeypatch.setitem(sys.modules, "vllm_lite.attention.flashinfer_backend",
                        types.SimpleNamespace(FlashInferBackend=FakeFlashInfer))
    monkeypatch.setattr(selector, "_flashinfer_problem", lambda device, dtype: None)
    kw = dict(num_heads=4, num_kv_heads=2, head_dim=8, scale=1.0, dtype=torch.bfloat16, device="cpu",
              max_num_seqs=4, max_blocks_per_seq=4)
    for tc in (None, True, False):
        assert selector.make_backend("auto", kernels=KernelConfig(flashinfer_tensor_cores=tc), **kw).name == \
            "flashinfer"
    selector.make_backend("auto", kernels=KernelConfig(kv_write_kernel=False), **kw)
    assert made == [(None, True), (True, True), (False, True), (None, False)]
    monkeypatch.setenv("VLLM_LITE_FLASHINFER_TENSOR_CORES", "0")
    selector.make_backend("flashinfer", **kw)  # no config given: the environment's default
    assert made[-1] == (False, True)
    backend = selector.make_backend("torch", kernels=KernelConfig(kv_write_kernel=True), **kw)
    assert isinstance(backend, TorchAttentionBackend)
