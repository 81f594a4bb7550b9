"""FlashInfer attention over the same paged KV cache as the torch backend (NHD: [blocks, 2, block, Hkv, D]).

One step = one `plan()`: `prepare(meta)` (outside the model) turns StepMetadata into FlashInfer's CSR page table
(kv_indptr, kv_indices, kv_last_page_len, qo_indptr) and plans the decode wrapper for pure-decode steps, else the
paged prefill wrapper (causal, bottom-right aligned: handles prefill chunks over cached prefixes mixed with
decodes). Every layer then calls `forward_rope` (q/k norm + rotary + this step's K/V write in one Triton kernel, then
the wrapper; `forward` is the same without norm and rotary).
Host-side work is a few vectorised ops on the *_cpu tensors; kv_indices is gathered on the device without a sync.

Decode kernel choice: the tensor-core decode path (FlashInfer runs its fa2 prefill kernel with one query row per
request) by default. vLLM keeps the CUDA-core kernel for GQA groups <= 4, but on the H100 the tensor-core path measured
faster for Qwen3-0.6B (group 2) at every batch size we run (docs/PERF.md: L1 1.48 vs 1.56 ms, L8 1.70 vs 1.77 ms,
T1 7.47 vs 7.70 s); `use_tensor_cores=False` (VLLM_LITE_FLASHINFER_TENSOR_CORES=0) selects the CUDA-core kernel.
Prefill on H100 resolves to fa3.

CUDA-graph contract (uniform steps: every request has the same query length q, 1 for plain decode or 1 + k when
verifying k speculative tokens; used by compile/cuda_graphs.py; bs below counts tokens, bs / q requests):
  capture, per padded batch size bs (<= max_num_seqs + 1024 padding rows):
    1. meta = backend.prepare(dummy_meta, graph_batch_size=bs)     # plans the bs wrapper, outside the graph
    2. warm up, then run the model under torch.cuda.graph(...) with static input buffers of bs tokens;
       ctx.metadata = meta. `forward` captures `write_kv_cache` over all bs rows and the wrapper's run().
  replay:
    1. copy the real step's inputs into the static buffers; the slot_mapping buffer the *captured* metadata
       points at (dummy_meta.slot_mapping, >= bs entries) must be refilled: real slots, then -1 for padding rows;
    2. backend.prepare(real_meta, graph_batch_size=bs)  # real_meta.num_reqs <= bs, all query lens 1
    3. graph.replay(); rows >= real_meta.num_reqs of the output are garbage and must be discarded.
  Padding requests attend to block 0 with seq_len q (no block is reserved; block 0 is only read; q <= block size).
  Prefill graphs (`prepare(meta, graph_batch_size=P, prefill_slots=R)`): the step's n <= R requests (T < P tokens),
  R - n one-token padding requests, then one padding request of the remaining tokens, every padding page block 0;
  the wrapper (one per (P, R), R + 1 requests) is planned in FlashInfer's graph mode, whose work split depends only
  on the batch size and the total P, so any query lengths replay the graph captured with R one-token requests.
  Padding tokens (slot -1) are never written to the cache. Each (q, bs) keeps its own wrapper (q = 1: the decode
  wrapper; q > 1: the paged prefill wrapper, causal, in CUDA-graph mode; static indptr / last_page_len buffers,
  8 MiB device + 8 MiB pinned int workspace inside FlashInfer); the float workspace and kv_indices buffer are shared
  since one graph replays at a time and its plan() precedes it on the stream.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import flashinfer
import numpy as np
import torch

from vllm_lite.attention.backend import AttentionSpec, StepMetadata
from vllm_lite.attention.prefill_graph import prefill_graph_tables
from vllm_lite.kernels.kv_cache import write_kv_cache
from vllm_lite.kernels.qk_norm_rope import HAS_TRITON, qk_norm_rope_cache_torch, qk_norm_rope_cache_triton

WORKSPACE_BYTES = 128 * 1024 * 1024
MAX_GRAPH_PADDING = 1024


@dataclass
class FlashInferMetadata:
    step: StepMetadata
    wrapper: Any  # the planned BatchDecode/BatchPrefill wrapper
    graph_batch_size: int | None  # set when planned for CUDA-graph decode (padded batch)


class FlashInferBackend:
    """All layers share one shape (num_heads, num_kv_heads, head_dim, scale, dtype), so one plan serves them all."""
    name = "flashinfer"
    supports_cuda_graphs = True
    # Device memory of each graph-mode wrapper beyond the shared buffers: FlashInfer allocates an 8 MiB int workspace
    # in every wrapper's constructor (plus 8 MiB of pinned host memory). The KV-cache budget reserves it per graph.
    graph_state_bytes = 8 * 1024 * 1024

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, dtype: torch.dtype,
                 device: torch.device | str, max_num_seqs: int, max_blocks_per_seq: int,
                 use_tensor_cores: bool | None = None, kv_write_kernel: bool = True) -> None:
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} not a multiple of num_kv_heads {num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale, self.dtype, self.device = scale, dtype, torch.device(device)
        self.max_num_seqs, self.max_blocks_per_seq = max_num_seqs, max_blocks_per_seq
        self.use_tensor_cores = True if use_tensor_cores is None else use_tensor_cores
        self.kv_write_kernel = kv_write_kernel  # False: the torch reference writes the KV cache in `forward`
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        self.prefill_wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")
        self.decode_wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_tensor_cores=self.use_tensor_cores)
        self._graph_wrappers: dict[int, Any] = {}
        self._graph_prefill_wrappers: dict[int, Any] = {}  # uniform q > 1, by number of (padded) requests
        self._prefill_graph_wrappers: dict[tuple[int, int], Any] = {}  # prefill graphs, by (tokens, request slots)
        self._graph_indices: torch.Tensor | None = None
        self._graph_last_page_len: dict[int, torch.Tensor] = {}
        # Per graph size, the page counts (kv_indptr) its wrapper was last planned for: the CUDA-core decode plan
        # (work split over CTAs) depends on nothing else, so while they stay the same (15 of 16 decode steps with
        # 16-token pages) a step only refreshes the page indices and last-page lengths the kernels read.
        self._graph_planned: dict[int, bytes] = {}
        # Page-table staging in pinned memory, so plan()'s uploads are truly asynchronous (a copy from pageable
        # memory may wait for the stream). Reused every step: the model runner waits until the device has read
        # the previous step's copies before preparing the next one.
        max_reqs = max_num_seqs + MAX_GRAPH_PADDING
        sizes = (max_reqs + 1, max_reqs, max_num_seqs * max_blocks_per_seq + MAX_GRAPH_PADDING, max_reqs + 1)
        pinned = torch.zeros(sum(sizes), dtype=torch.int32, pin_memory=self.device.type == "cuda")
        self._indptr_host, self._last_host, self._indices_host, self._qo_host = torch.split(pinned, sizes)
        # The graph wrappers' plan() copies host page indices with a blocking copy (a stream sync that would stall
        # async scheduling); it copies device indices asynchronously, so they are uploaded here first.
        self._indices_dev = torch.zeros(sizes[2], dtype=torch.int32, device=self.device)

    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        return (num_blocks, 2, block_size, num_kv_heads, head_dim)

    # ---- CUDA graphs -------------------------------------------------------------------------------------------
    def decode_graph_state(self, batch_size: int) -> Any:
        """The graph-safe decode wrapper for a padded batch size (created once, static buffers, reused)."""
        wrapper = self._graph_wrappers.get(batch_size)
        if wrapper is not None:
            return wrapper
        if batch_size > self.max_num_seqs + MAX_GRAPH_PADDING:
            raise ValueError(f"graph batch size {batch_size} too large for max_num_seqs {self.max_num_seqs}")
        if self._graph_indices is None:
            # Real requests use <= max_num_seqs * max_blocks_per_seq pages; each padding request one more.
            size = self.max_num_seqs * self.max_blocks_per_seq + MAX_GRAPH_PADDING
            self._graph_indices = torch.zeros(size, dtype=torch.int32, device=self.device)
        last_page_len = torch.ones(batch_size, dtype=torch.int32, device=self.device)
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_cuda_graph=True, use_tensor_cores=self.use_tensor_cores,
            paged_kv_indptr_buffer=torch.zeros(batch_size + 1, dtype=torch.int32, device=self.device),
            paged_kv_indices_buffer=self._graph_indices, paged_kv_last_page_len_buffer=last_page_len)
        self._graph_wrappers[batch_size] = wrapper
        self._graph_last_page_len[batch_size] = last_page_len
        return wrapper

    def _graph_prefill_wrapper(self, num_reqs: int) -> Any:
        """A new paged prefill wrapper in CUDA-graph mode for num_reqs requests: static indptr / last-page buffers,
        the shared page-index buffer."""
        self.decode_graph_state(1)  # makes the shared page-index buffer
        return flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_cuda_graph=True,
            qo_indptr_buf=torch.zeros(num_reqs + 1, dtype=torch.int32, device=self.device),
            paged_kv_indptr_buf=torch.zeros(num_reqs + 1, dtype=torch.int32, device=self.device),
            paged_kv_indices_buf=self._graph_indices,
            paged_kv_last_page_len_buf=torch.zeros(num_reqs, dtype=torch.int32, device=self.device))

    def verify_graph_state(self, num_reqs: int) -> Any:
        """The graph-safe paged prefill wrapper for uniform steps of q > 1 tokens per request (created once)."""
        wrapper = self._graph_prefill_wrappers.get(num_reqs)
        if wrapper is None:
            wrapper = self._graph_prefill_wrappers[num_reqs] = self._graph_prefill_wrapper(num_reqs)
        return wrapper

    def prefill_graph_state(self, num_tokens: int, num_slots: int) -> Any:
        """The graph-safe paged prefill wrapper of prefill graphs of num_tokens and num_slots request slots (one per
        pair, created once): num_slots + 1 requests, the last one padding."""
        key = (num_tokens, num_slots)
        wrapper = self._prefill_graph_wrappers.get(key)
        if wrapper is None:
            wrapper = self._prefill_graph_wrappers[key] = self._graph_prefill_wrapper(num_slots + 1)
        return wrapper

    def _prepare_prefill_graph(self, meta: StepMetadata, graph_batch_size: int, num_slots: int) -> FlashInferMetadata:
        """The step's requests, then padding requests over block 0 (attention/prefill_graph.py)."""
        n, bs = meta.num_reqs, meta.block_size
        bt = None if meta.block_table_cpu is None else meta.block_table_cpu[:n].numpy()
        t = prefill_graph_tables(meta.query_start_loc_cpu[: n + 1].numpy(), meta.seq_lens_cpu[:n].numpy(),
                                 graph_batch_size, num_slots, bs, bt)
        b = num_slots + 1
        indptr, last, qo = self._indptr_host[: b + 1], self._last_host[:b], self._qo_host[: b + 1]
        indptr.numpy()[:] = t.kv_indptr
        last.numpy()[:] = t.last_page_len
        qo.numpy()[:] = t.qo_indptr
        total, count = t.num_real_pages, int(t.kv_indptr[-1])
        indices = self._indices_dev[:count]
        if t.kv_indices is not None:
            self._indices_host[:count].numpy()[:] = t.kv_indices
            indices.copy_(self._indices_host[:count], non_blocking=True)
        else:
            indices[:total].copy_(_gather_kv_indices(meta.block_table[:n], meta.seq_lens[:n], bs, total))
            indices[total:].zero_()
        wrapper = self.prefill_graph_state(graph_batch_size, num_slots)
        wrapper.plan(qo, indptr, indices, last, self.num_heads, self.num_kv_heads, self.head_dim, bs, causal=True,
                     q_data_type=self.dtype, kv_data_type=self.dtype, sm_scale=self.scale)
        return FlashInferMetadata(meta, wrapper, graph_batch_size)

    # ---- per step ----------------------------------------------------------------------------------------------
    def prepare(self, meta: StepMetadata, graph_batch_size: int | None = None,
                prefill_slots: int = 0) -> FlashInferMetadata:
        """Build the page table and plan the wrapper this step uses (decode, graph decode, graph verification, graph
        prefill or paged prefill). graph_batch_size: the padded token count of a step replayed from a CUDA graph (a
        uniform step, or with prefill_slots = R a prefill graph's: at most R requests of fewer tokens in all)."""
        if prefill_slots:
            return self._prepare_prefill_graph(meta, graph_batch_size, prefill_slots)
        n, bs = meta.num_reqs, meta.block_size
        q = meta.max_query_len
        if graph_batch_size is not None and (meta.num_tokens != n * q or graph_batch_size % q):
            raise ValueError("CUDA-graph attention needs a uniform step (the same query length for every request)")
        pad = 0 if graph_batch_size is None else graph_batch_size // q - n
        if pad < 0:
            raise ValueError(f"{n} requests do not fit graph batch size {graph_batch_size}")
        # numpy on the host views: a handful of vectorised ops, no per-op torch dispatch cost.
        seq_lens = meta.seq_lens_cpu[:n].numpy()
        nblk = (seq_lens + bs - 1) // bs
        indptr_t, last_t = self._indptr_host[: n + pad + 1], self._last_host[: n + pad]
        indptr, last_page_len = indptr_t.numpy(), last_t.numpy()
        indptr[0] = 0
        np.cumsum(nblk, out=indptr[1: n + 1])
        total = int(indptr[n])
        last_page_len[:n] = seq_lens - (nblk - 1) * bs
        last_page_len[n:] = q  # padding requests: one page (block 0), q tokens
        indptr[n + 1:] = total + np.arange(1, pad + 1, dtype=np.int32)
        if meta.block_table_cpu is not None and total + pad <= len(self._indices_host):
            # From the host copy of the block table: no device kernels; plan() uploads it.
            bt = meta.block_table_cpu[:n].numpy()
            indices_t = self._indices_host[: total + pad]
            indices = indices_t.numpy()
            indices[:total] = bt[np.arange(bt.shape[1])[None, :] < nblk[:, None]]
            indices[total:] = 0
        else:
            indices_t = _gather_kv_indices(meta.block_table[:n], meta.seq_lens[:n], bs, total)
            if pad:
                indices_t = torch.cat([indices_t, torch.zeros(pad, dtype=indices_t.dtype, device=indices_t.device)])
        indptr, indices, last_page_len = indptr_t, indices_t, last_t
        common = dict(q_data_type=self.dtype, kv_data_type=self.dtype, sm_scale=self.scale)
        if graph_batch_size is not None and q > 1:
            wrapper = self.verify_graph_state(n + pad)
            if indices.device != self.device:
                staged = self._indices_dev[: len(indices)]
                staged.copy_(indices, non_blocking=True)
                indices = staged
            qo_indptr = self._qo_host[: n + pad + 1]
            qo_indptr.numpy()[:] = np.arange(0, (n + pad) * q + 1, q, dtype=np.int32)
            wrapper.plan(qo_indptr, indptr, indices, last_page_len, self.num_heads, self.num_kv_heads,
                         self.head_dim, bs, causal=True, **common)
            return FlashInferMetadata(meta, wrapper, graph_batch_size)
        if graph_batch_size is not None:
            wrapper = self.decode_graph_state(graph_batch_size)
            key = indptr.numpy().tobytes()
            if not self.use_tensor_cores and self._graph_planned.get(graph_batch_size) == key:
                self._graph_indices[: len(indices)].copy_(indices, non_blocking=True)
                self._graph_last_page_len[graph_batch_size].copy_(last_page_len, non_blocking=True)
                return FlashInferMetadata(meta, wrapper, graph_batch_size)
            if indices.device != self.device:
                staged = self._indices_dev[: len(indices)]
                staged.copy_(indices, non_blocking=True)
                indices = staged
            wrapper.plan(indptr, indices, last_page_len, self.num_heads, self.num_kv_heads, self.head_dim, bs,
                         **common)
            self._graph_planned[graph_batch_size] = key
            return FlashInferMetadata(meta, wrapper, graph_batch_size)
        if meta.max_query_len == 1:
            wrapper = self.decode_wrapper
            wrapper.plan(indptr, indices, last_page_len, self.num_heads, self.num_kv_heads, self.head_dim, bs,
                         **common)
        else:
            wrapper = self.prefill_wrapper
            qo_indptr = meta.query_start_loc_cpu[: n + 1]
            wrapper.plan(qo_indptr, indptr, indices, last_page_len, self.num_heads, self.num_kv_heads,
                         self.head_dim, bs, causal=True, **common)
        return FlashInferMetadata(meta, wrapper, None)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                spec: AttentionSpec, meta: FlashInferMetadata) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D] -> [T, Hq, D]; rows past the real tokens are padding (garbage out)."""
        n = self._num_written(q.shape[0], meta)
        write_kv_cache(k[:n], v[:n], kv_cache, meta.step.slot_mapping[:n], meta.step.block_size,
                       use_kernel=self.kv_write_kernel)
        return self._attend(q, kv_cache, meta)

    def forward_rope(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float,
                     kv_cache: torch.Tensor, spec: AttentionSpec, meta: FlashInferMetadata) -> torch.Tensor:
        """One Triton kernel for q/k RMSNorm + rotary + the KV write (kernels/qk_norm_rope.py), then attention."""
        t = q.shape[0]
        n = self._num_written(t, meta)
        step = meta.step
        fused = qk_norm_rope_cache_triton if (HAS_TRITON and q.is_cuda and cos.dtype == q.dtype) \
            else qk_norm_rope_cache_torch
        q = fused(q, k, v, cos, sin, q_weight, k_weight, eps, spec.head_dim, kv_cache, step.slot_mapping,
                  step.block_size, n)
        out = self._attend(q.view(t, spec.num_heads, spec.head_dim), kv_cache, meta)
        return out.view(t, spec.num_heads * spec.head_dim)

    @staticmethod
    def _num_written(t: int, meta: FlashInferMetadata) -> int:
        """Rows whose k/v go into the cache: all under a graph (padding rows have slot -1), else the real tokens."""
        if meta.graph_batch_size is not None:
            # Under a graph the real token count is not known at capture: write all rows, skipping slot -1.
            if t != meta.graph_batch_size:
                raise ValueError(f"graph planned for {meta.graph_batch_size} tokens, got {t}")
            return t
        return meta.step.num_tokens

    @staticmethod
    def _attend(q: torch.Tensor, kv_cache: torch.Tensor, meta: FlashInferMetadata) -> torch.Tensor:
        n = q.shape[0] if meta.graph_batch_size is not None else meta.step.num_tokens
        if q.shape[0] == n:
            return meta.wrapper.run(q, kv_cache)
        out = torch.zeros_like(q)
        meta.wrapper.run(q[:n], kv_cache, out=out[:n])
        return out


def _gather_kv_indices(block_table: torch.Tensor, seq_lens: torch.Tensor, block_size: int,
                       total: int) -> torch.Tensor:
    """Concatenate each request's first ceil(seq_len / block_size) block ids, on the device, without a sync."""
    dev = block_table.device
    nblk = (seq_lens.to(torch.int64) + block_size - 1) // block_size
    req = torch.repeat_interleave(torch.arange(len(nblk), device=dev), nblk, output_size=total)
    starts = torch.cumsum(nblk, 0) - nblk
    col = torch.arange(total, device=dev) - starts[req]
    return block_table[req, col].to(torch.int32)

