"""EAGLE proposals that never wait for the host: one CUDA graph per batch size runs the whole proposal.

The host path (`ModelDrafter.propose`) must know each request's accepted drafts before it can stage the catch-up, so it
waits for the verification's tokens, then stages and plans three forwards (catch-up, k - 1 decodes) with their host
work in between: on the H200 0.55 ms of waiting and 2.29 ms of host work per step, for a one-layer head whose kernels
take ~0.1 ms (docs/PERF.md).

In a uniform verification step (every request verified k drafts: k + 1 rows each), and in a plain decode step (one row
each: a request the adaptive rule gave no drafts), everything the proposal needs is on the device already, so it is
computed there, as vLLM's padded drafter batch does:
- the catch-up runs over all k + 1 rows of each request (row i at position start + i reads the target's hidden state
  of verification row i and the token the verification produced at row i). Rows past the accepted drafts compute
  garbage whose KV the decode steps (and the next catch-up) overwrite before anything reads it;
- the first draft comes from row a (a = accepted drafts, counted from the rejection sampler's -1 padding), and the
  decode steps run at start + a + i, their KV slots looked up in the block table on the device;
- attention reads every row's own position (`RowsMetadata`, kernels/paged_rows_attention.py), so no attention plan
  needs the lengths on the host.
The host only copies the step's starts and block tables in and launches one graph right after the rejection sampler:
the proposal no longer waits for the verification's tokens. Greedy requests and unseeded sampling ones (their drafts
drawn by the global generator, whose draws CUDA graphs replay; a seeded request's own generator cannot be captured,
so such steps take the host path); batch sizes up to MAX_BATCH.
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vllm_lite.kernels.kv_cache import write_kv_cache
from vllm_lite.kernels.paged_rows_attention import rows_attention
from vllm_lite.kernels.qk_norm_rope import qk_norm_rope_torch
from vllm_lite.sample.topk_topp import random_sample

logger = logging.getLogger("vllm_lite.spec_decode")

MAX_BATCH = 8  # requests per proposal graph: speculation pays at small batches


@dataclass
class RowsMetadata:
    """A forward whose rows carry their own request, position and KV slot (device tensors, built on the device)."""
    row_req: torch.Tensor  # [T] request index into block_table
    positions: torch.Tensor  # [T] int64: the row attends to positions 0 .. positions[t] of its request
    slots: torch.Tensor  # [T] int64 KV slot of the row
    block_table: torch.Tensor  # [R, max_blocks] int32
    block_size: int


class RowsBackend:
    """The drafter's attention backend, extended: forwards with RowsMetadata write their KV and attend per row on
    the device; any other metadata goes to the wrapped backend (FlashInfer or torch) unchanged."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def forward_rope(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float,
                     kv_cache: torch.Tensor, spec: Any, meta: Any) -> torch.Tensor:
        if not isinstance(meta, RowsMetadata):
            return self.inner.forward_rope(q, k, v, cos, sin, q_weight, k_weight, eps, kv_cache, spec, meta)
        q, k = qk_norm_rope_torch(q, k, cos, sin, q_weight, k_weight, eps, spec.head_dim)
        t = q.shape[0]
        write_kv_cache(k.reshape(t, spec.num_kv_heads, spec.head_dim),
                       v.reshape(t, spec.num_kv_heads, spec.head_dim), kv_cache, meta.slots, meta.block_size)
        out = rows_attention(q.reshape(t, spec.num_heads, spec.head_dim), kv_cache, meta.block_table, meta.row_req,
                             meta.positions, spec.scale)
        return out.reshape(t, spec.num_heads * spec.head_dim)


class PaddedProposer:
    """Static buffers, the proposal body, and its CUDA graphs (one per batch size 1 .. max_batch) for an EAGLE drafter
    (`spec_decode/eagle.py`). `propose` launches; the drafts stay on the device."""

    def __init__(self, drafter: Any, max_batch: int) -> None:
        self.d = drafter
        self.k = drafter.k
        self.max_batch = max_batch
        self.block_size = drafter.block_size
        self.max_blocks = drafter.max_blocks_per_seq
        dev = drafter.device
        q = self.k + 1
        self.sampled = torch.zeros(max_batch, q, dtype=torch.int64, device=dev)
        self.temperatures = torch.zeros(max_batch, dtype=torch.float32, device=dev)
        widths = drafter.hidden_source_widths()
        self.sources = [torch.zeros(max_batch * q, w, dtype=drafter.dtype, device=dev) for w in widths]
        # starts [R], limits [R], block table [R, max_blocks]: one host buffer, one copy per proposal
        self.meta_len = max_batch * (2 + self.max_blocks)
        pin = dev.type == "cuda"
        self.meta_host = torch.zeros(self.meta_len, dtype=torch.int64, pin_memory=pin)
        self.meta_dev = torch.zeros(self.meta_len, dtype=torch.int64, device=dev) if pin else self.meta_host
        self._copied: torch.cuda.Event | None = None
        # (requests, sampling, tokens per request of the step: k + 1 or 1)
        self.graphs: dict[tuple[int, bool, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, bool, int], tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.num_proposals = 0
        self.num_replays = 0

    # ---- the proposal ------------------------------------------------------------------------------------------
    def _pick(self, hidden: torch.Tensor, r: int, sampling: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Greedy drafts (argmax), or with `sampling` each row with a temperature draws from softmax(logits / t)
        by the global generator (CUDA graphs replay its draws) and returns those probabilities."""
        if not sampling:
            return self.d._argmax(hidden), None
        logits = self.d._logits(hidden)
        t = self.temperatures[:r]
        probs = torch.softmax(logits.float() / torch.where(t > 0, t, 1.0)[:, None], dim=-1)
        drawn = random_sample(probs.clone(), {})
        return torch.where(t > 0, drawn, logits.argmax(dim=-1)), probs

    def _body(self, r: int, sampling: bool = False, q: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Drafts [r, k] (and with `sampling` their distributions [r, k, V]) from the static inputs of r requests
        whose step computed q tokens each (k + 1: a verification, the default; 1: a plain decode step); device ops
        only (captured as a graph on CUDA)."""
        d, k, bs = self.d, self.k, self.block_size
        q = q or k + 1
        dev = self.sampled.device
        sampled = self.sampled[:r, :q]
        meta = self.meta_dev[: r * (2 + self.max_blocks)]
        starts, limits = meta[:r], meta[r: 2 * r]
        table = meta[2 * r:].view(r, self.max_blocks)
        table32 = table.to(torch.int32)
        accepted = (sampled >= 0).sum(dim=1) - 1
        req = torch.arange(r, device=dev)
        row_req = torch.arange(r * q, device=dev) // q
        pos = (starts[:, None] + torch.arange(q, device=dev)[None, :]).flatten()
        slots = table[row_req, pos // bs] * bs + pos % bs
        d.set_rows_hidden([s[: r * q] for s in self.sources])
        d.ctx.metadata = RowsMetadata(row_req, pos, slots, table32, bs)
        hidden, next_hidden = d._split(d.forward(sampled.clamp(min=0).flatten().to(torch.int32),
                                                 pos.to(torch.int32)))
        last = req * q + accepted
        ids, probs = self._pick(hidden[last], r, sampling)
        drafts, dists = [ids], [probs]
        prev = None if next_hidden is None else next_hidden[last]
        base = starts + accepted
        for i in range(1, k):
            p = torch.minimum(base + i, limits)
            d._set_decode_hidden(prev)
            d.ctx.metadata = RowsMetadata(req, p, table[req, p // bs] * bs + p % bs, table32, bs)
            hidden, next_hidden = d._split(d.forward(ids.to(torch.int32), p.to(torch.int32)))
            ids, probs = self._pick(hidden[:r], r, sampling)
            drafts.append(ids)
            dists.append(probs)
            prev = None if next_hidden is None else next_hidden[:r]
        return torch.stack(drafts, dim=1), torch.stack(dists, dim=1) if sampling else None

    def propose(self, sampled: torch.Tensor, sources: list[torch.Tensor], starts: np.ndarray,
                block_ids: list[np.ndarray], max_model_len: int, temperatures: list[float] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """sampled [R, q]: a verification's tokens (q = k + 1, -1 after each request's last) or a plain decode
        step's (q = 1), sources: the target's hidden states of the step's R * q rows, starts: each request's first
        position this step, block_ids: its KV blocks, temperatures: per request (0: greedy; None: all greedy; sampling rows must be
        unseeded). Returns drafts [R, k] on the device and, when a row samples, the draft distributions [R, k, V]
        (static buffers on CUDA: valid until the next proposal of this shape)."""
        r, q = sampled.shape
        sampling = temperatures is not None and any(t > 0 for t in temperatures)
        if sampling:
            self.temperatures[:r].copy_(torch.tensor(temperatures, dtype=torch.float32), non_blocking=True)
        if self._copied is not None:  # the pinned buffer is reused: its previous copy must have been read
            self._copied.synchronize()
        host = self.meta_host.numpy()
        host[:r] = starts
        for j, b in enumerate(block_ids):
            host[r + j] = min(len(b) * self.block_size, max_model_len) - 1
            row = 2 * r + j * self.max_blocks
            host[row: row + len(b)] = b
        if self.meta_dev is not self.meta_host:
            self.meta_dev[: r * (2 + self.max_blocks)].copy_(self.meta_host[: r * (2 + self.max_blocks)],
                                                            non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        self.sampled[:r, :q].copy_(sampled)
        for dst, src in zip(self.sources, sources):
            dst[: src.shape[0]].copy_(src)
        self.num_proposals += 1
        graph = self.graphs.get((r, sampling, q))
        if graph is None:
            return self._body(r, sampling, q)
        graph.replay()
        self.num_replays += 1
        return self.outputs[r, sampling, q]

    # ---- capture -----------------------------------------------------------------------------------------------
    def capture(self) -> None:
        """One graph per batch size, kind (greedy, sampling) and step (verification, plain decode); dummy inputs
        write the drafter's KV in block 0 only (nothing is cached yet, and every real row is rewritten before it is
        read)."""
        dev = self.sampled.device
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        self.sampled.zero_()
        self.temperatures.fill_(1.0)
        for r in range(self.max_batch, 0, -1):
            for sampling, q in itertools.product((False, True), (self.k + 1, 1)):
                self.meta_dev.zero_()  # starts 0, block table all block 0 ...
                self.meta_dev[r: 2 * r].fill_(self.k)  # ... and limits that keep decode positions in block 0
                self._body(r, sampling, q)  # warm-up: compiles this shape, autotunes, initialises lazy state
                torch.cuda.synchronize(dev)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = self._body(r, sampling, q)
                self.graphs[r, sampling, q], self.outputs[r, sampling, q] = graph, out
        torch.cuda.synchronize(dev)
        logger.info("captured %d EAGLE proposal graphs (batch sizes 1..%d, k = %d) in %.2f s", len(self.graphs),
                    self.max_batch, self.k, time.perf_counter() - start)
