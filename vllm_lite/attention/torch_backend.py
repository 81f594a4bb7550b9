"""Reference attention over the paged KV cache in plain PyTorch: correct for any batch, on CPU and CUDA.

Decode rows (one query token) are attended in one batched call; prefill chunks one request at a time, each with a
causal mask offset by its cached prefix. It is the ground truth the FlashInfer backend is tested against, so it
writes the KV cache with the plain-PyTorch reference (kernels/kv_cache.py) whatever KernelConfig.kv_write_kernel says.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vllm_lite.attention.backend import AttentionSpec, StepMetadata, forward_rope_reference
# The reference KV write lives with its kernel; re-exported under the name this module has always offered.
from vllm_lite.kernels.kv_cache import write_kv_cache_torch as write_kv_cache

__all__ = ["TorchAttentionBackend", "TorchAttentionMetadata", "write_kv_cache"]


@dataclass
class TorchAttentionMetadata:
    step: StepMetadata
    decode_rows: torch.Tensor  # request indices with one query token
    decode_token_idx: torch.Tensor  # their token positions in the flat batch
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, max_len] bool: key position < seq_len
    decode_bt: torch.Tensor | None
    prefill_spans: list[tuple[int, int, int, int]]  # (request, q_start, q_end, seq_len)


class TorchAttentionBackend:
    name = "torch"
    supports_cuda_graphs = False  # prepare() builds host-side state the graph would not see
    graph_state_bytes = 0

    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        return (num_blocks, 2, block_size, num_kv_heads, head_dim)

    def prepare(self, meta: StepMetadata) -> TorchAttentionMetadata:
        qsl = meta.query_start_loc_cpu[: meta.num_reqs + 1]
        seq_lens = meta.seq_lens_cpu[: meta.num_reqs]
        qlens = qsl[1:] - qsl[:-1]
        is_decode = qlens == 1
        dev = meta.block_table.device
        decode_rows = torch.nonzero(is_decode).flatten()
        decode_mask = decode_bt = None
        if len(decode_rows):
            dec_lens = seq_lens[decode_rows]
            nblk = int((int(dec_lens.max()) + meta.block_size - 1) // meta.block_size)
            decode_bt = meta.block_table[decode_rows.to(dev), :nblk].long()
            pos = torch.arange(nblk * meta.block_size, device=dev)
            decode_mask = (pos[None, :] < dec_lens.to(dev)[:, None])[:, None, None, :]
        prefill_rows = torch.nonzero(~is_decode).flatten().tolist()
        spans = [(r, int(qsl[r]), int(qsl[r + 1]), int(seq_lens[r])) for r in prefill_rows]
        return TorchAttentionMetadata(meta, decode_rows.to(dev), qsl[:-1][decode_rows].to(dev).long(),
                                      decode_mask, decode_bt, spans)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                spec: AttentionSpec, meta: TorchAttentionMetadata) -> torch.Tensor:
        step = meta.step
        n = step.num_tokens
        write_kv_cache(k[:n], v[:n], kv_cache, step.slot_mapping[:n], step.block_size)
        out = torch.zeros_like(q)
        if meta.decode_bt is not None:
            out[meta.decode_token_idx] = self._decode(q[meta.decode_token_idx], kv_cache, spec, meta)
        for row, qs, qe, seq_len in meta.prefill_spans:
            out[qs:qe] = self._prefill_one(q[qs:qe], kv_cache, spec, step.block_table[row], seq_len,
                                           step.block_size)
        return out

    def forward_rope(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float,
                     kv_cache: torch.Tensor, spec: AttentionSpec, meta: TorchAttentionMetadata) -> torch.Tensor:
        return forward_rope_reference(self, q, k, v, cos, sin, q_weight, k_weight, eps, kv_cache, spec, meta)

    @staticmethod
    def _decode(q: torch.Tensor, kv_cache: torch.Tensor, spec: AttentionSpec,
                meta: TorchAttentionMetadata) -> torch.Tensor:
        bt = meta.decode_bt
        b, nblk = bt.shape
        kv = kv_cache[bt]  # [B, nblk, 2, bs, Hkv, D]
        k = kv[:, :, 0].reshape(b, -1, spec.num_kv_heads, spec.head_dim).transpose(1, 2)
        v = kv[:, :, 1].reshape(b, -1, spec.num_kv_heads, spec.head_dim).transpose(1, 2)
        out = _sdpa(q[:, :, None, :], k, v, meta.decode_mask, spec)  # q: [B, Hq, 1, D]
        return out[:, :, 0, :]

    @staticmethod
    def _prefill_one(q: torch.Tensor, kv_cache: torch.Tensor, spec: AttentionSpec, block_row: torch.Tensor,
                     seq_len: int, block_size: int) -> torch.Tensor:
        nblk = (seq_len + block_size - 1) // block_size
        kv = kv_cache[block_row[:nblk].long()]
        k = kv[:, 0].reshape(-1, spec.num_kv_heads, spec.head_dim)[:seq_len].transpose(0, 1)
        v = kv[:, 1].reshape(-1, spec.num_kv_heads, spec.head_dim)[:seq_len].transpose(0, 1)
        qlen = q.shape[0]
        prefix = seq_len - qlen
        qpos = torch.arange(qlen, device=q.device)[:, None] + prefix
        mask = torch.arange(seq_len, device=q.device)[None, :] <= qpos
        out = _sdpa(q.transpose(0, 1)[None], k[None], v[None], mask[None, None], spec)
        return out[0].transpose(0, 1)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
    """q: [B, Hq, Lq, D]; k, v: [B, Hkv, L, D]; GQA by repeating KV heads."""
    groups = spec.num_heads // spec.num_kv_heads
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=spec.scale)
