"""The page table of a step replayed from a prefill graph (compile/cuda_graphs.py), in FlashInfer's CSR layout.

A prefill graph of P tokens and R request slots runs the step's n <= R requests (T tokens), then R - n one-token
padding requests, then one padding request of the P - T - (R - n) tokens left; every padding request reads block 0
only (its tokens have KV slot -1, so nothing is written). Pure numpy, so the layout is tested without a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PrefillGraphTables:
    qo_indptr: np.ndarray  # [R + 2] query rows per request (cumulative)
    kv_indptr: np.ndarray  # [R + 2] pages per request (cumulative)
    last_page_len: np.ndarray  # [R + 1]
    num_real_pages: int  # kv_indices[:num_real_pages] are the requests' pages; the rest are block 0
    kv_indices: np.ndarray | None = None  # [kv_indptr[-1]] page ids, when the block table was given


def prefill_graph_tables(query_start_loc: np.ndarray, seq_lens: np.ndarray, num_tokens: int, num_slots: int,
                         block_size: int, block_table: np.ndarray | None = None) -> PrefillGraphTables:
    """query_start_loc [n + 1] and seq_lens [n] of the step's requests; num_tokens: the graph's padded size P;
    block_table [n, max_blocks] (optional): the page ids too."""
    n = len(seq_lens)
    used = int(query_start_loc[n])
    dummies = num_slots - n
    pad = num_tokens - used - dummies  # the last padding request's tokens
    if not 0 < n <= num_slots or pad < 1:
        raise ValueError(f"a prefill graph of {num_tokens} tokens and {num_slots} request slots cannot run {n} "
                         f"requests of {used} tokens")
    nblk = (seq_lens.astype(np.int64) + block_size - 1) // block_size
    pblk = -(-pad // block_size)
    total = int(nblk.sum())
    ones = np.arange(1, dummies + 1, dtype=np.int64)
    kv_indptr = np.concatenate([[0], np.cumsum(nblk), total + ones, [total + dummies + pblk]])
    last = np.concatenate([seq_lens - (nblk - 1) * block_size, np.ones(dummies, dtype=np.int64),
                           [pad - (pblk - 1) * block_size]])
    qo = np.concatenate([query_start_loc[: n + 1], used + ones, [num_tokens]])
    indices = None
    if block_table is not None:
        indices = np.zeros(int(kv_indptr[-1]), dtype=np.int32)
        indices[:total] = block_table[:n][np.arange(block_table.shape[1])[None, :] < nblk[:, None]]
    return PrefillGraphTables(qo.astype(np.int32), kv_indptr.astype(np.int32), last.astype(np.int32), total,
                              indices)
