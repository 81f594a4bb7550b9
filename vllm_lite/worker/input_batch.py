"""Builds one step's flat inputs with numpy and moves them to the device in a single non-blocking copy.

All integer inputs of a step (token ids, positions, KV slots, logits rows, query/sequence offsets, block table) are
packed back to back into one persistent pinned int32 buffer; the device tensors are views into one persistent
device buffer. No device tensor is allocated per step and no Python loop runs per token; the views of a step shape
are built once and reused (steady decode repeats its shape), and block tables come from per-request int32 arrays.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vllm_lite.attention import StepMetadata
from vllm_lite.kernels.alignment import packed_starts

_ALIGN = 16  # int32 elements = 64 bytes
_MAX_LAYOUTS = 4096  # cached field layouts (one per distinct step shape); cleared when full


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T] int32, device
    positions: torch.Tensor  # [T] int32, device
    logits_indices: torch.Tensor  # [R] int32, device: the rows whose logits are computed (1 + k per sampling req)
    meta: StepMetadata
    # Async scheduling: input_ids[fill_dst[i]] must become the previous step's sampled_ids[fill_src[i]] (None: none).
    fill_dst: torch.Tensor | None = None
    fill_src: torch.Tensor | None = None


class InputStager:
    def __init__(self, max_tokens: int, max_reqs: int, max_blocks_per_req: int, block_size: int,
                 device: torch.device) -> None:
        self.max_tokens = max_tokens
        self.max_reqs = max_reqs
        self.max_blocks = max_blocks_per_req
        self.block_size = block_size
        self.device = device
        size = 3 * max_tokens + 5 * max_reqs + 1 + max_reqs * max_blocks_per_req + 9 * _ALIGN
        pin = device.type == "cuda"
        self.host = torch.zeros(size, dtype=torch.int32, pin_memory=pin)
        self.host_np = self.host.numpy()
        self.dev = torch.zeros(size, dtype=torch.int32, device=device) if pin else self.host
        self._arange = np.arange(max(max_tokens, max_reqs, max_blocks_per_req) + 1, dtype=np.int64)
        self._layouts: dict[tuple[int, ...], _Layout] = {}

    def stage(self, token_ids: list[np.ndarray], starts: np.ndarray, query_lens: np.ndarray,
              block_ids: list[np.ndarray], sample_rows: np.ndarray, fill_dst: np.ndarray | None = None,
              fill_src: np.ndarray | None = None, sample_counts: np.ndarray | None = None,
              sample_ends: np.ndarray | None = None, rows_as_requests: bool = False) -> StepInputs:
        """token_ids[i]: the tokens request i computes this step; starts[i]: its position of the first one;
        block_ids[i]: its KV blocks (int32 array or list). fill_dst / fill_src: flat token indices whose ids come
        from the previous step's sampled ids (rows). sample_counts[j]: logits rows of sampling request j, its
        last 1 + k tokens when it verifies k speculative tokens (None: 1 each). sample_ends[j]: the flat index after
        sampling request j's last logits row (None: the end of its tokens; padded requests end earlier).
        rows_as_requests: the attention metadata describes every token as a one-token request of its own (its
        request's blocks, context up to its position), so a verification step attends with the decode kernel and
        replays a decode graph (KernelConfig.verify_as_decode); everything else stays per request."""
        num_reqs = len(query_lens)
        num_tokens = int(query_lens.sum())
        pure_decode = num_tokens == num_reqs
        rows_view = rows_as_requests and not pure_decode
        nblk = np.fromiter(map(len, block_ids), dtype=np.int64, count=num_reqs)
        max_blocks = int(nblk.max())
        num_fill = 0 if fill_dst is None else len(fill_dst)
        num_logits = len(sample_rows) if sample_counts is None else int(sample_counts.sum())
        lay = self._layout(num_tokens, num_logits, num_tokens if rows_view else num_reqs, num_fill, max_blocks)
        h = lay.host
        cu = np.cumsum(query_lens)
        if pure_decode:  # one token per request: positions are the starts, request i owns token i
            req_index, positions = self._arange[:num_reqs], starts
        else:
            req_index = np.repeat(self._arange[:num_reqs], query_lens)
            positions = starts[req_index] + self._arange[:num_tokens] - np.repeat(cu - query_lens, query_lens)
        h.ids[:] = np.concatenate(token_ids) if num_reqs > 1 else token_ids[0]
        h.pos[:] = positions
        # entries past a request's blocks: block 0, always a valid index (the torch backend gathers them)
        if rows_view:  # the requests' table first: the attention fields get one row per token below
            table = np.zeros((num_reqs, max_blocks), dtype=np.int32)
        else:
            table = h.bt.reshape(num_reqs, max_blocks)
            table.fill(0)
        table[self._arange[:max_blocks] < nblk[:, None]] = np.concatenate(block_ids) if num_reqs > 1 else block_ids[0]
        np.multiply(table[req_index, positions // self.block_size], self.block_size, out=h.slot)
        h.slot += positions % self.block_size
        ends = cu[sample_rows] if sample_ends is None else sample_ends
        if sample_counts is None:
            h.lidx[:] = ends - 1
        else:  # the last counts[j] tokens of each sampling request
            first = np.repeat(ends - sample_counts, sample_counts)
            h.lidx[:] = first + self._arange[:num_logits] - np.repeat(np.cumsum(sample_counts) - sample_counts,
                                                                     sample_counts)
        if rows_view:  # attention fields: token t is request t
            h.bt.reshape(num_tokens, max_blocks)[:] = table[req_index]
            cu, query_lens, starts = self._arange[1: num_tokens + 1], np.ones(num_tokens, dtype=np.int64), positions
        h.qsl[0] = 0
        h.qsl[1:] = cu
        seq_lens = starts + query_lens
        h.seq[:] = seq_lens
        if num_fill:
            h.dst[:] = fill_dst
            h.src[:] = fill_src
        if self.dev is not self.host:
            self.dev[:lay.end].copy_(self.host[:lay.end], non_blocking=True)
        d, c = lay.dev, lay.cpu
        meta = StepMetadata(
            num_reqs=len(query_lens), num_tokens=num_tokens, query_start_loc=d.qsl, seq_lens=d.seq, block_table=d.bt,
            slot_mapping=d.slot, query_start_loc_cpu=c.qsl, seq_lens_cpu=c.seq, max_query_len=int(query_lens.max()),
            max_seq_len=int(seq_lens.max()), block_size=self.block_size, block_table_cpu=c.bt)
        if num_fill:
            return StepInputs(d.ids, d.pos, d.lidx, meta, d.dst, d.src)
        return StepInputs(d.ids, d.pos, d.lidx, meta)

    def _layout(self, num_tokens: int, num_sample: int, num_reqs: int, num_fill: int, max_blocks: int) -> "_Layout":
        """Views of every field for these sizes (cached: steady decode repeats the same sizes step after step, and
        building ~30 numpy/torch views costs more than filling them on a slow host)."""
        key = (num_tokens, num_sample, num_reqs, num_fill, max_blocks)
        lay = self._layouts.get(key)
        if lay is not None:
            return lay
        sizes = [num_tokens, num_tokens, num_tokens, num_sample, num_reqs + 1, num_reqs, num_fill, num_fill,
                 num_reqs * max_blocks]
        # Each field starts 64-byte aligned: compiled kernels are specialised on input alignment.
        begin = packed_starts(sizes, 4, 4 * _ALIGN)[:-1]
        spans = [slice(b, b + n) for b, n in zip(begin, sizes)]
        lay = _Layout(_Fields(*(self.host_np[sp] for sp in spans)), _Fields(*(self.dev[sp] for sp in spans)),
                      _Fields(*(self.host[sp] for sp in spans)), int(begin[-1] + sizes[-1]))
        for fields in (lay.dev, lay.cpu):
            fields.bt = fields.bt.view(num_reqs, max_blocks)
        if len(self._layouts) >= _MAX_LAYOUTS:
            self._layouts.clear()
        self._layouts[key] = lay
        return lay


@dataclass
class _Fields:
    """One step's fields in a buffer: token ids, positions, KV slots, logits rows, query start offsets, sequence
    lengths, fill destinations / sources, block table."""
    ids: Any
    pos: Any
    slot: Any
    lidx: Any
    qsl: Any
    seq: Any
    dst: Any
    src: Any
    bt: Any


@dataclass
class _Layout:
    host: _Fields  # numpy views of the pinned host buffer (filled each step)
    dev: _Fields  # device views (what the step's kernels read)
    cpu: _Fields  # torch views of the host buffer (host-side consumers such as FlashInfer's plan)
    end: int  # elements to copy
