"""Builds one step's flat inputs with numpy and moves them to the device in a single non-blocking copy.

All integer inputs of a step (token ids, positions, KV slots, logits rows, query/sequence offsets, block table) are
packed back to back into one persistent pinned int32 buffer; the device tensors are views into one persistent
device buffer. No device tensor is allocated per step and no Python loop runs per token.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vllm_lite.attention import StepMetadata

_ALIGN = 16  # int32 elements = 64 bytes


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T] int32, device
    positions: torch.Tensor  # [T] int32, device
    logits_indices: torch.Tensor  # [S] int32, device: last scheduled token of each sampling request
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

    def stage(self, token_ids: list[np.ndarray], starts: np.ndarray, query_lens: np.ndarray,
              block_ids: list[list[int]], sample_rows: np.ndarray, fill_dst: np.ndarray | None = None,
              fill_src: np.ndarray | None = None) -> StepInputs:
        """token_ids[i]: the tokens request i computes this step; starts[i]: its position of the first one.
        fill_dst / fill_src: flat token indices whose ids come from the previous step's sampled ids (rows)."""
        num_reqs = len(query_lens)
        num_tokens = int(query_lens.sum())
        cu = np.cumsum(query_lens)
        req_index = np.repeat(np.arange(num_reqs), query_lens)
        positions = starts[req_index] + np.arange(num_tokens) - np.repeat(cu - query_lens, query_lens)
        max_blocks = max(len(b) for b in block_ids)
        table = np.zeros((num_reqs, max_blocks), dtype=np.int32)
        for i, blocks in enumerate(block_ids):
            table[i, : len(blocks)] = blocks
        seq_lens = starts + query_lens

        num_fill = 0 if fill_dst is None else len(fill_dst)
        sizes = np.array([num_tokens, num_tokens, num_tokens, len(sample_rows), num_reqs + 1, num_reqs, num_fill,
                          num_fill, table.size])
        # Each field starts 64-byte aligned: compiled kernels are specialised on input alignment.
        begin = np.concatenate([[0], np.cumsum(-(-sizes // _ALIGN) * _ALIGN)[:-1]])
        ids_s, pos_s, slot_s, lidx_s, qsl_s, seq_s, dst_s, src_s, bt_s = (
            slice(b, b + n) for b, n in zip(begin, sizes))
        buf = self.host_np
        buf[ids_s] = np.concatenate(token_ids) if num_reqs > 1 else token_ids[0]
        buf[pos_s] = positions
        slots = buf[slot_s]
        np.multiply(table[req_index, positions // self.block_size], self.block_size, out=slots)
        slots += positions % self.block_size
        buf[lidx_s] = cu[sample_rows] - 1
        buf[qsl_s] = np.concatenate([[0], cu])
        buf[seq_s] = seq_lens
        buf[bt_s] = table.ravel()
        if num_fill:
            buf[dst_s] = fill_dst
            buf[src_s] = fill_src
        end = int(begin[-1] + sizes[-1])
        if self.dev is not self.host:
            self.dev[:end].copy_(self.host[:end], non_blocking=True)
        d, h = self.dev, self.host
        meta = StepMetadata(
            num_reqs=num_reqs, num_tokens=num_tokens, query_start_loc=d[qsl_s], seq_lens=d[seq_s],
            block_table=d[bt_s].view(num_reqs, max_blocks), slot_mapping=d[slot_s], query_start_loc_cpu=h[qsl_s],
            seq_lens_cpu=h[seq_s], max_query_len=int(query_lens.max()), max_seq_len=int(seq_lens.max()),
            block_size=self.block_size, block_table_cpu=h[bt_s].view(num_reqs, max_blocks))
        if num_fill:
            return StepInputs(d[ids_s], d[pos_s], d[lidx_s], meta, d[dst_s], d[src_s])
        return StepInputs(d[ids_s], d[pos_s], d[lidx_s], meta)
