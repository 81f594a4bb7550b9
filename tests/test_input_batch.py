"""InputStager against a plain reference: every field of random mixed / pure-decode steps, including repeated step
shapes (cached layouts), stale table entries from earlier steps, and per-request block arrays that grow."""
from __future__ import annotations

import numpy as np
import torch

from vllm_lite.protocol import NewRequestData
from vllm_lite.sampling_params import SamplingParams
from vllm_lite.worker.input_batch import InputStager
from vllm_lite.worker.request_state import CachedRequestState

BS = 16


def _reference(token_ids, starts, query_lens, block_ids, sample_rows):
    positions = np.concatenate([np.arange(s, s + q) for s, q in zip(starts, query_lens)])
    req = np.repeat(np.arange(len(query_lens)), query_lens)
    max_blocks = max(len(b) for b in block_ids)
    table = np.zeros((len(block_ids), max_blocks), dtype=np.int64)
    for i, b in enumerate(block_ids):
        table[i, :len(b)] = b
    slots = table[req, positions // BS] * BS + positions % BS
    cu = np.cumsum(query_lens)
    return dict(ids=np.concatenate(token_ids), pos=positions, slot=slots, lidx=cu[sample_rows] - 1,
                qsl=np.concatenate([[0], cu]), seq=starts + query_lens, table=table)


def test_stage_matches_reference_over_random_steps():
    rng = np.random.default_rng(0)
    stager = InputStager(max_tokens=512, max_reqs=8, max_blocks_per_req=64, block_size=BS, device=torch.device("cpu"))
    shapes = []
    for step in range(60):
        n = int(rng.integers(1, 9))
        decode = step % 3 != 0  # pure-decode steps, with mixed prefill steps in between
        query_lens = np.ones(n, dtype=np.int64) if decode else rng.integers(1, 40, n)
        starts = rng.integers(0, 600, n)
        nblk = (starts + query_lens + BS - 1) // BS
        block_ids = [rng.permutation(5000)[:k].astype(np.int32) for k in nblk]
        token_ids = [rng.integers(0, 1000, q) for q in query_lens]
        sample_rows = np.flatnonzero(rng.random(n) < 0.7)
        if step % 7 == 0 and shapes:  # repeat an earlier shape: its cached layout is reused
            token_ids, starts, query_lens, block_ids, sample_rows = shapes[-1]
            n, decode = len(query_lens), bool((query_lens == 1).all())
        shapes.append((token_ids, starts, query_lens, block_ids, sample_rows))
        fill_dst = np.arange(min(n, 3), dtype=np.int32) if decode else None
        fill_src = fill_dst[::-1].copy() if decode else None
        got = stager.stage(token_ids, starts, query_lens, block_ids, sample_rows, fill_dst, fill_src)
        want = _reference(token_ids, starts, query_lens, block_ids, sample_rows)
        m = got.meta
        assert got.input_ids.tolist() == want["ids"].tolist()
        assert got.positions.tolist() == want["pos"].tolist()
        assert m.slot_mapping.tolist() == want["slot"].tolist()
        assert got.logits_indices.tolist() == want["lidx"].tolist()
        assert m.query_start_loc.tolist() == want["qsl"].tolist() == m.query_start_loc_cpu.tolist()
        assert m.seq_lens.tolist() == want["seq"].tolist() == m.seq_lens_cpu.tolist()
        # Entries past a request's blocks are block 0, never another step's leftovers.
        assert m.block_table.tolist() == want["table"].tolist() == m.block_table_cpu.tolist()
        assert m.num_reqs == n and m.num_tokens == int(query_lens.sum())
        assert m.max_query_len == int(query_lens.max()) and m.max_seq_len == int((starts + query_lens).max())
        if decode:
            assert got.fill_dst.tolist() == fill_dst.tolist() and got.fill_src.tolist() == fill_src.tolist()
        else:
            assert got.fill_dst is None


def test_request_state_blocks_grow():
    data = NewRequestData("r", [1, 2, 3], [], SamplingParams(), [7, 8], 0)
    state = CachedRequestState(data, torch.device("cpu"))
    assert state.block_ids.tolist() == [7, 8] and state.block_ids.dtype == np.int32
    for k in range(40):
        state.add_blocks([100 + k])
    assert state.block_ids.tolist() == [7, 8] + [100 + k for k in range(40)]
