"""The page table of a step replayed from a prefill graph (vllm_lite/attention/prefill_graph.py): the step's requests
keep their query rows and context, padding requests fill the graph's request slots and tokens over block 0."""
from __future__ import annotations

import numpy as np
import pytest

from vllm_lite.attention.prefill_graph import prefill_graph_tables


def _lens(t):
    qo = np.diff(t.qo_indptr)
    kv = (np.diff(t.kv_indptr) - 1) * 16 + t.last_page_len
    return qo.tolist(), kv.tolist()


def test_one_request_prompt_padded_with_one_request():
    t = prefill_graph_tables(np.array([0, 100]), np.array([100]), 128, 1, 16)
    assert t.qo_indptr.tolist() == [0, 100, 128] and t.kv_indptr.tolist() == [0, 7, 9]
    assert _lens(t) == ([100, 28], [100, 28]) and t.num_real_pages == 7
    # after a cached prefix: 9 new tokens of a 14-token context; the padding spans one page
    t = prefill_graph_tables(np.array([0, 9]), np.array([14]), 16, 1, 16)
    assert _lens(t) == ([9, 7], [14, 7]) and t.kv_indptr.tolist() == [0, 1, 2]


def test_slots_filled_with_one_token_requests():
    # two decodes around an 11-token prompt in a graph of 4 slots and 16 tokens: one one-token dummy, then 2 tokens
    t = prefill_graph_tables(np.array([0, 1, 12, 13]), np.array([6, 11, 15]), 16, 4, 16)
    assert _lens(t) == ([1, 11, 1, 1, 2], [6, 11, 15, 1, 2])
    assert t.kv_indptr.tolist() == [0, 1, 2, 3, 4, 5] and t.num_real_pages == 3
    assert t.qo_indptr[-1] == 16 and t.qo_indptr.dtype == np.int32
    qo, kv = _lens(t)
    assert all(k >= q for q, k in zip(qo, kv))  # causal, bottom-right aligned: no request sees fewer keys than rows


@pytest.mark.parametrize("qsl,seq_lens,tokens,slots", [
    ([0, 16], [16], 16, 1),  # the last padding request would have no token
    ([0, 1, 2, 3], [1, 1, 1], 16, 2),  # more requests than slots
    ([0, 13], [13], 16, 4),  # 13 tokens + 3 one-token dummies leave nothing for the last
])
def test_steps_that_do_not_fit_are_refused(qsl, seq_lens, tokens, slots):
    with pytest.raises(ValueError, match="cannot run"):
        prefill_graph_tables(np.array(qsl), np.array(seq_lens), tokens, slots, 16)


def _csr_attention(q, cache, qo_indptr, kv_indptr, kv_indices, last_page_len, bs):
    """Single-head attention as FlashInfer reads the CSR page table: request r's keys are its pages' first
    (pages - 1) * bs + last_page_len slots; causal, aligned to the bottom right (row j of q_len rows sees kv_len - q_len
    + j + 1 keys)."""
    out = np.zeros_like(q)
    for r in range(len(qo_indptr) - 1):
        pages = kv_indices[kv_indptr[r]: kv_indptr[r + 1]]
        kv_len = (len(pages) - 1) * bs + last_page_len[r]
        keys = cache[pages].reshape(-1, q.shape[1])[:kv_len]
        q_len = qo_indptr[r + 1] - qo_indptr[r]
        for j in range(q_len):
            seen = keys[: kv_len - q_len + j + 1]
            s = seen @ q[qo_indptr[r] + j]
            w = np.exp(s - s.max())
            out[qo_indptr[r] + j] = (w / w.sum()) @ seen
    return out


def test_tables_give_each_real_row_exactly_its_context():
    """Two decodes and a prompt after a cached prefix, in a graph of 4 slots and 32 tokens: through the tables each
    real query row attends exactly to its own request's positions 0 .. its position (read from its blocks), whatever
    the padding requests read."""
    bs, rng = 4, np.random.default_rng(0)
    cache = rng.standard_normal((12, bs, 8))  # block 0: what padding reads
    block_table = np.array([[3, 7, 0, 0], [5, 1, 9, 2], [11, 0, 0, 0]], dtype=np.int32)
    seq_lens = np.array([6, 14, 2])  # request 1: 9 new tokens after 5 cached; requests 0 and 2 decode one token
    qsl = np.array([0, 1, 10, 11])
    t = prefill_graph_tables(qsl, seq_lens, 32, 4, bs, block_table)
    assert t.kv_indices.tolist()[: t.num_real_pages] == [3, 7, 5, 1, 9, 2, 11] and not t.kv_indices[7:].any()
    q = rng.standard_normal((32, 8))
    got = _csr_attention(q, cache, t.qo_indptr, t.kv_indptr, t.kv_indices, t.last_page_len, bs)
    for i in range(3):
        keys = cache[block_table[i]].reshape(-1, 8)
        for j in range(qsl[i], qsl[i + 1]):
            pos = seq_lens[i] - (qsl[i + 1] - j)  # the row's own position
            s = keys[: pos + 1] @ q[j]
            w = np.exp(s - s.max())
            np.testing.assert_allclose(got[j], (w / w.sum()) @ keys[: pos + 1], rtol=1e-12)
