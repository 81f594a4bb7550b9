"""The attention-backend interface shared by the torch reference backend and the FlashInfer backend.

A step's batch is a flat list of tokens grouped by request: request i owns query tokens
[query_start_loc[i], query_start_loc[i+1]) and, after this step, a context of seq_lens[i] tokens whose KV lives in
the blocks of block_table[i]. Any mix of prefill chunks (with cached prefixes) and decodes is one batch.
The model runner builds `StepMetadata` once per step; the backend turns it into its own metadata (FlashInfer runs
its `plan()` there) before the model runs, so nothing is planned inside the model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass
class StepMetadata:
    """Backend-independent description of one step's batch (device tensors plus their CPU copies)."""
    num_reqs: int
    num_tokens: int
    query_start_loc: torch.Tensor  # [num_reqs + 1] int32, device
    seq_lens: torch.Tensor  # [num_reqs] int32, device: context length after this step
    block_table: torch.Tensor  # [num_reqs, max_blocks] int32, device
    slot_mapping: torch.Tensor  # [num_tokens] int64, device: block_id * block_size + offset for each token
    query_start_loc_cpu: torch.Tensor
    seq_lens_cpu: torch.Tensor
    max_query_len: int
    max_seq_len: int
    block_size: int
    block_table_cpu: torch.Tensor | None = None  # host copy of block_table, when the builder has one

    @property
    def is_pure_decode(self) -> bool:
        return self.max_query_len == 1

    @classmethod
    def for_capture(cls, num_tokens: int, query_len: int, slot_mapping: torch.Tensor,
                    block_size: int) -> "StepMetadata":
        """A dummy uniform batch for CUDA-graph capture: num_tokens // query_len requests of query_len tokens in
        block 0 (seq_len query_len), writing nowhere (slot_mapping all -1). Shared by the target and the drafter."""
        n = num_tokens // query_len
        device = slot_mapping.device
        qsl = torch.arange(0, num_tokens + 1, query_len, dtype=torch.int32)
        lens = torch.full((n,), query_len, dtype=torch.int32)
        return cls(n, num_tokens, qsl.to(device), lens.to(device), torch.zeros(n, 1, dtype=torch.int32, device=device),
                   slot_mapping, qsl, lens, query_len, query_len, block_size)


@dataclass(frozen=True)
class AttentionSpec:
    """Shape of one attention layer: what the backend needs to size caches and kernels."""
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float


class AttentionBackend(Protocol):
    name: str
    supports_cuda_graphs: bool  # prepare(meta, graph_batch_size=bs) plans static buffers a captured graph reads
    graph_state_bytes: int  # device memory of the attention state each captured graph keeps (the KV budget's reserve)

    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        """Per-layer KV cache tensor shape."""
        ...

    def prepare(self, meta: StepMetadata) -> Any:
        """Turn the step's metadata into backend metadata (plan kernels); called once per step."""
        ...

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                spec: AttentionSpec, meta: Any) -> torch.Tensor:
        """Write k/v into the paged cache, then attend. q: [T, Hq, D], k/v: [T, Hkv, D] -> [T, Hq, D]."""
        ...

    def forward_rope(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float,
                     kv_cache: torch.Tensor, spec: AttentionSpec, meta: Any) -> torch.Tensor:
        """What the model calls: q [T, Hq*D], k/v [T, Hkv*D] straight from the projection -> [T, Hq*D]; per-head
        RMSNorm of q/k (when weights are given), rotary (cos/sin [T, rot/2]), then `forward`'s write + attend."""
        ...


def forward_rope_reference(backend: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
                           eps: float, kv_cache: torch.Tensor, spec: AttentionSpec, meta: Any) -> torch.Tensor:
    """`forward_rope` out of plain-PyTorch q/k norm + rotary and the backend's own `forward`."""
    from vllm_lite.kernels.qk_norm_rope import qk_norm_rope_torch
    q, k = qk_norm_rope_torch(q, k, cos, sin, q_weight, k_weight, eps, spec.head_dim)
    t = q.shape[0]
    v = v.reshape(t, spec.num_kv_heads, spec.head_dim)
    out = backend.forward(q.view(t, spec.num_heads, spec.head_dim), k.view(t, spec.num_kv_heads, spec.head_dim), v,
                          kv_cache, spec, meta)
    return out.reshape(t, spec.num_heads * spec.head_dim)


class AttentionContext:
    """Per-model state the attention layers read each forward: the backend, the KV caches and the step metadata.

    The model runner owns one and passes it to the model's constructor, so there is no global forward context.
    """

    def __init__(self, backend: AttentionBackend) -> None:
        self.backend = backend
        self.kv_caches: list[torch.Tensor] = []
        self.metadata: Any = None

    def set_step(self, meta: StepMetadata) -> None:
        self.metadata = self.backend.prepare(meta)
