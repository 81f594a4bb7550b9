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
