"""Scheduler: exact states for budget splitting, chunked prefill, prefix hits, preemption, aborts, stops, spec."""
from __future__ import annotations

import pytest

from vllm_lite.config import CacheConfig, SchedulerConfig
from vllm_lite.protocol import ModelRunnerOutput, SchedulerOutput
from vllm_lite.core.scheduler import Scheduler
from vllm_lite.request import Request, RequestStatus
from vllm_lite.sampling_params import SamplingParams

EOS = 2


def make_sched(num_blocks: int = 64, block_size: int = 4, max_num_seqs: int = 16, budget: int = 64,
               max_model_len: int = 64, caching: bool = True) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget),
                     CacheConfig(block_size=block_size, enable_prefix_caching=caching), num_blocks, max_model_len)


def make_req(rid: str, prompt: list[int] | int, eos: int | None = EOS, **sp) -> Request:
    tokens = list(range(100, 100 + prompt)) if isinstance(prompt, int) else prompt
    return Request(rid, tokens, SamplingParams(**sp), eos_token_id=eos)


def runner_out(so: SchedulerOutput, tokens: dict[str, list[int]], logprobs=None) -> ModelRunnerOutput:
    req_ids = list(so.num_scheduled_tokens)
    lps = [None if logprobs is None else logprobs.get(r) for r in req_ids]
    return ModelRunnerOutput(req_ids, [tokens.get(r, []) for r in req_ids], lps)


def step(s: Scheduler, tokens: dict[str, list[int]]):
    so = s.schedule()
    out = s.update_from_output(so, runner_out(so, tokens))
    return so, {o.request_id: o for o in out.outputs}


# ---------------------------------------------------------------- admission
def test_add_request_rejects_long_and_empty_prompts():
    s = make_sched(max_model_len=16)
    with pytest.raises(ValueError, match=r"17 tokens.*16"):
        s.add_request(make_req("a", 17))
    with pytest.raises(ValueError, match="empty"):
        s.add_request(make_req("b", []))
    s.add_request(make_req("c", 16))
    with pytest.raises(ValueError, match="already"):
        s.add_request(make_req("c", 3))
    assert s.get_num_unfinished_requests() == 1 and [r.request_id for r in s.waiting] == ["c"]


def test_kv_cache_too_small_for_max_model_len():
    with pytest.raises(ValueError, match="max_model_len=64"):
        make_sched(num_blocks=4, block_size=4, max_model_len=64)


# ---------------------------------------------------------------- budgets
def test_budget_split_running_first_then_waiting():
    s = make_sched(budget=10, caching=False)
    s.add_request(make_req("a", 6))
    s.add_request(make_req("b", 6))
    so = s.schedule()
    assert so.num_scheduled_tokens == {"a": 6, "b": 4} and so.total_num_scheduled_tokens == 10
    assert [(n.req_id, n.block_ids, n.num_computed_tokens) for n in so.scheduled_new_reqs] == \
        [("a", [0, 1], 0), ("b", [2], 0)]
    out = s.update_from_output(so, runner_out(so, {"a": [7]}))
    assert [(o.request_id, o.new_token_ids) for o in out.outputs] == [("a", [7])]
    assert (s.requests["a"].num_computed_tokens, s.requests["b"].num_computed_tokens) == (6, 4)
    s.add_request(make_req("c", 20))
    so = s.schedule()
    # running a decodes 1, running b finishes its prefill (2), waiting c gets the rest of the budget (7).
    assert so.num_scheduled_tokens == {"a": 1, "b": 2, "c": 7}
    assert [(c.req_id, c.new_block_ids, c.num_computed_tokens) for c in so.scheduled_cached_reqs] == \
        [("a", [], 6), ("b", [3], 4)]
    assert [(n.req_id, n.block_ids) for n in so.scheduled_new_reqs] == [("c", [4, 5])]


def test_chunked_prefill_exact_steps():
    s = make_sched(budget=8, caching=False)
    s.add_request(make_req("a", 25))
    expected = [(8, 0, [0, 1]), (8, 8, [2, 3]), (8, 16, [4, 5]), (1, 24, [6])]
    for i, (n, computed_before, blocks) in enumerate(expected):
        so = s.schedule()
        assert so.num_scheduled_tokens == {"a": n}
        if i == 0:
            assert so.scheduled_new_reqs[0].block_ids == blocks and not so.scheduled_cached_reqs
        else:
            assert [(c.new_block_ids, c.num_computed_tokens) for c in so.scheduled_cached_reqs] == \
                [(blocks, computed_before)]
        last = i == len(expected) - 1
        out = s.update_from_output(so, runner_out(so, {"a": [9]} if last else {}))
        assert len(out.outputs) == (1 if last else 0)
        assert s.requests["a"].num_computed_tokens == computed_before + n
    assert s.requests["a"].output_token_ids == [9]
    so = s.schedule()
    assert so.num_scheduled_tokens == {"a": 1} and so.scheduled_cached_reqs[0].num_computed_tokens == 25


def test_max_num_seqs():
    s = make_sched(max_num_seqs=2)
    for rid in "abc":
        s.add_request(make_req(rid, 4, max_tokens=2))
    so, outs = step(s, {"a": [5], "b": [5]})
    assert set(so.num_scheduled_tokens) == {"a", "b"} and [r.request_id for r in s.waiting] == ["c"]
    so, outs = step(s, {"a": [6], "b": [6]})  # both hit max_tokens=2
    assert so.num_scheduled_tokens == {"a": 1, "b": 1}
    assert outs["a"].finish_reason == "length" and not s.running
    so = s.schedule()
    assert so.num_scheduled_tokens == {"c": 4} and so.finished_req_ids == ["a", "b"]


# ---------------------------------------------------------------- prefix caching
def test_prefix_cache_hit_skips_compute():
    s = make_sched()
    prompt = list(range(10, 20))  # 10 tokens: 2 full blocks
    s.add_request(make_req("a", prompt))
    so, _ = step(s, {"a": [50]})
    assert so.num_scheduled_tokens == {"a": 10}
    s.add_request(make_req("b", prompt[:8] + [77, 78, 79]))
    so = s.schedule()
    assert so.num_scheduled_tokens == {"a": 1, "b": 3}
    nb = so.scheduled_new_reqs[0]
    assert (nb.req_id, nb.num_computed_tokens, nb.block_ids) == ("b", 8, [0, 1, 3])
    assert s.requests["b"].num_computed_tokens == 11 and s.requests["b"].num_cached_tokens == 8
    out = s.update_from_output(so, runner_out(so, {"a": [51], "b": [60]}))
    assert {o.request_id: o.num_cached_tokens for o in out.outputs} == {"a": 0, "b": 8}
    st = out.scheduler_stats
    assert (st.prefix_cache_queries, st.prefix_cache_hits) == (21, 8)
    # Identical prompt to a: all 10 tokens cached would leave nothing to sample -> 8 hit, 2 computed.
    s.add_request(make_req("c", prompt))
    so = s.schedule()
    assert so.num_scheduled_tokens["c"] == 2 and so.scheduled_new_reqs[0].num_computed_tokens == 8
    assert s.reset_prefix_cache()
    s.add_request(make_req("d", prompt))
    so = s.schedule()
    assert so.num_scheduled_tokens["d"] == 10


# ---------------------------------------------------------------- preemption
def test_preemption_of_last_running_request_and_resume():
    s = make_sched(num_blocks=4, block_size=4, max_model_len=16, caching=False)
    s.add_request(make_req("a", 8, max_tokens=3))
    s.add_request(make_req("b", 6, max_tokens=5))
    so, _ = step(s, {"a": [30], "b": [40]})
    assert s.kv_cache_manager.get_block_ids("a") == [0, 1] and s.kv_cache_manager.get_block_ids("b") == [2, 3]
    s.add_request(make_req("c", 4))
    # a needs a 3rd block, none free -> b (last running) is preempted by recompute.
    so = s.schedule()
    b = s.requests["b"]
    assert so.num_scheduled_tokens == {"a": 1} and so.finished_req_ids == ["b"]
    assert [(c.req_id, c.new_block_ids) for c in so.scheduled_cached_reqs] == [("a", [3])]
    assert (b.status, b.num_computed_tokens, b.num_preemptions, s.num_preemptions) == \
        (RequestStatus.PREEMPTED, 0, 1, 1)
    assert [r.request_id for r in s.waiting] == ["b", "c"] and [r.request_id for r in s.running] == ["a"]
    assert s.kv_cache_manager.get_block_ids("b") == [] and s.kv_cache_manager.get_num_free_blocks() == 1
    assert not so.scheduled_new_reqs  # no admissions in a step that preempted
    s.update_from_output(so, runner_out(so, {"a": [31]}))
    # b (7 tokens, 2 blocks) cannot fit in 1 free block; c must not overtake it.
    so, outs = step(s, {"a": [32]})
    assert so.num_scheduled_tokens == {"a": 1} and so.finished_req_ids == []
    assert outs["a"].finish_reason == "length" and [r.request_id for r in s.waiting] == ["b", "c"]
    so = s.schedule()
    assert so.finished_req_ids == ["a"] and so.num_scheduled_tokens == {"b": 7, "c": 4}
    nb = so.scheduled_new_reqs[0]
    assert (nb.req_id, nb.prompt_token_ids, nb.output_token_ids, nb.num_computed_tokens, nb.block_ids) == \
        ("b", list(range(100, 106)), [40], 0, [2, 3])
    assert so.scheduled_new_reqs[1].block_ids == [1]
    assert b.status == RequestStatus.RUNNING
    out = s.update_from_output(so, runner_out(so, {"b": [41], "c": [42]}))
    assert s.requests["b"].output_token_ids == [40, 41]
    assert out.scheduler_stats.num_preemptions == 1


def test_request_preempts_itself_when_it_is_last():
    s = make_sched(num_blocks=4, block_size=4, max_model_len=16, caching=False)
    s.add_request(make_req("a", 6))
    s.add_request(make_req("b", 8))
    step(s, {"a": [1], "b": [1]})
    so = s.schedule()  # a fits in its blocks; b needs a 3rd block and is itself the victim
    assert so.num_scheduled_tokens == {"a": 1} and so.finished_req_ids == ["b"]
    assert [r.request_id for r in s.waiting] == ["b"] and s.requests["b"].num_computed_tokens == 0
    assert s.kv_cache_manager.get_num_free_blocks() == 2


# ---------------------------------------------------------------- aborts
def test_abort_frees_blocks_at_once():
    s = make_sched(num_blocks=8, max_model_len=32)
    s.add_request(make_req("a", 9))
    s.add_request(make_req("w", 4))
    so = s.schedule()
    s.add_request(make_req("x", 4))
    assert s.kv_cache_manager.get_num_free_blocks() == 4
    outs = s.finish_requests(["a", "x", "nope"])
    assert [(o.request_id, o.finish_reason, o.new_token_ids) for o in outs] == [("a", "abort", []), ("x", "abort", [])]
    assert s.kv_cache_manager.get_num_free_blocks() == 7
    assert [r.request_id for r in s.running] == ["w"] and not s.waiting
    # Tokens arriving for the aborted request are dropped.
    out = s.update_from_output(so, runner_out(so, {"a": [5], "w": [6]}))
    assert [o.request_id for o in out.outputs] == ["w"]
    so = s.schedule()
    assert so.finished_req_ids == ["a", "x"] and so.num_scheduled_tokens == {"w": 1}
    assert s.finish_requests("a") == []


# ---------------------------------------------------------------- stop conditions
def _decode(s: Scheduler, rid: str, toks: list[list[int]]):
    outs = []
    for t in toks:
        _, o = step(s, {rid: t})
        outs.append(o[rid])
    return outs


def test_stop_eos():
    s = make_sched()
    s.add_request(make_req("a", 4))
    outs = _decode(s, "a", [[5], [EOS]])
    assert (outs[1].new_token_ids, outs[1].finish_reason, outs[1].stop_reason) == ([EOS], "stop", None)
    assert not s.has_unfinished_requests() and s.kv_cache_manager.get_num_free_blocks() == 64


def test_ignore_eos_and_max_tokens():
    s = make_sched()
    s.add_request(make_req("a", 4, ignore_eos=True, max_tokens=3))
    outs = _decode(s, "a", [[EOS], [EOS], [EOS]])
    assert [o.finish_reason for o in outs] == [None, None, "length"]


def test_stop_token_ids_stop_reason():
    s = make_sched()
    s.add_request(make_req("a", 4, stop_token_ids=[9, 11]))
    outs = _decode(s, "a", [[5], [11]])
    assert (outs[1].finish_reason, outs[1].stop_reason, outs[1].new_token_ids) == ("stop", 11, [11])
    assert s.finished_req_ids == {"a": None}


def test_min_tokens_delays_eos_and_stop_ids():
    s = make_sched()
    s.add_request(make_req("a", 4, min_tokens=3, stop_token_ids=[9]))
    outs = _decode(s, "a", [[EOS], [9], [EOS]])
    assert [o.finish_reason for o in outs] == [None, None, "stop"]
    s.add_request(make_req("b", 4, min_tokens=2, max_tokens=2))  # length is checked first, as in vLLM
    outs = _decode(s, "b", [[EOS], [EOS]])
    assert [o.finish_reason for o in outs] == [None, "length"]
    s.add_request(make_req("c", 62, min_tokens=5, max_tokens=10))  # the context limit still applies
    outs = _decode(s, "c", [[EOS], [EOS]])
    assert [o.finish_reason for o in outs] == [None, "length"]


def test_max_model_len_stop():
    s = make_sched(max_model_len=16)
    s.add_request(make_req("a", 14, max_tokens=100))
    outs = _decode(s, "a", [[5], [6]])
    assert [o.finish_reason for o in outs] == [None, "length"]
    assert s.finished_req_ids == {"a": None}
    s.add_request(make_req("b", 16))  # prompt fills the context: exactly one token
    outs = _decode(s, "b", [[5]])
    assert outs[0].finish_reason == "length"


# ---------------------------------------------------------------- speculative decoding
def test_spec_tokens_scheduled_and_rolled_back():
    s = make_sched()
    s.add_request(make_req("a", 6))
    step(s, {"a": [20]})
    a = s.requests["a"]
    a.spec_token_ids = [21, 22, 23]
    so = s.schedule()
    assert so.num_scheduled_tokens == {"a": 4} and so.scheduled_spec_decode_tokens == {"a": [21, 22, 23]}
    assert a.num_computed_tokens == 10  # 6 computed + 1 + 3 spec
    # 1 draft accepted + 1 corrected token: 2 back of 4 -> roll back 2.
    out = s.update_from_output(so, runner_out(so, {"a": [21, 30]}))
    assert out.outputs[0].new_token_ids == [21, 30]
    assert (a.num_computed_tokens, a.num_tokens, a.spec_token_ids) == (8, 9, [])
    # All accepted + bonus token.
    a.spec_token_ids = [31, 32]
    so = s.schedule()
    assert so.num_scheduled_tokens == {"a": 3}
    s.update_from_output(so, runner_out(so, {"a": [31, 32, 33]}))
    assert (a.num_computed_tokens, a.num_tokens) == (11, 12)


def test_spec_tokens_truncated_at_stop_with_logprobs():
    s = make_sched()
    s.add_request(make_req("a", 4))
    step(s, {"a": [20]})
    a = s.requests["a"]
    a.spec_token_ids = [21, EOS, 23]
    so = s.schedule()
    lps = [[(21, -0.1, 1)], [(EOS, -0.2, 1)], [(23, -0.3, 1)], [(24, -0.4, 1)]]
    out = s.update_from_output(so, runner_out(so, {"a": [21, EOS, 23, 24]}, {"a": lps}))
    o = out.outputs[0]
    assert (o.new_token_ids, o.finish_reason, o.new_logprobs) == ([21, EOS], "stop", lps[:2])
    assert a.output_token_ids == [20, 21, EOS] and not s.running


def test_spec_tokens_capped_by_budget_and_max_model_len():
    s = make_sched(max_model_len=10)
    s.add_request(make_req("a", 7, max_tokens=100))
    step(s, {"a": [20]})  # 8 tokens, 7 computed
    s.requests["a"].spec_token_ids = [1, 3, 4, 5]
    so = s.schedule()  # 2 tokens left in the context window: one draft, then the sampled last token
    assert so.num_scheduled_tokens == {"a": 2} and so.scheduled_spec_decode_tokens == {"a": [1]}
    out = s.update_from_output(so, runner_out(so, {"a": [1, 3]}))
    assert out.outputs[0].new_token_ids == [1, 3] and out.outputs[0].finish_reason == "length"


def test_stats():
    s = make_sched(num_blocks=16)
    s.add_request(make_req("a", 8))
    s.add_request(make_req("b", 4))
    s.schedule()
    st = s.make_stats()
    assert (st.num_running_reqs, st.num_waiting_reqs, st.kv_cache_usage) == (2, 0, pytest.approx(3 / 16))
    assert (st.prefix_cache_queries, st.prefix_cache_hits, st.num_preemptions) == (12, 0, 0)


def _check_invariants(s: Scheduler) -> None:
    kv = s.kv_cache_manager
    pool = kv.block_pool
    refs = [0] * pool.num_blocks
    for blocks in kv.req_to_blocks.values():
        for b in blocks:
            refs[b.block_id] += 1
    assert [b.ref_cnt for b in pool.blocks] == refs
    free = pool.free_block_queue.get_all_free_blocks()
    assert sorted(b.block_id for b in free) == [i for i, r in enumerate(refs) if r == 0]
    assert set(kv.req_to_blocks) == {r.request_id for r in s.running}
    for h, b in pool.cached_block_hash_to_block.items():
        assert b.block_hash == h
    for r in s.running:
        assert len(kv.req_to_blocks[r.request_id]) * kv.block_size >= r.num_computed_tokens


@pytest.mark.parametrize("seed", range(5))
def test_random_workload_invariants(seed):
    import random
    rng = random.Random(seed)
    s = make_sched(num_blocks=12, block_size=4, max_num_seqs=4, budget=16, max_model_len=40)
    shared = [rng.randrange(3, 50) for _ in range(12)]
    done, n_added, kv_store = set(), 0, {}
    for it in range(300):
        if n_added < 25 and rng.random() < 0.3:
            prompt = shared[:rng.randrange(0, 12)] + [rng.randrange(3, 50) for _ in range(rng.randrange(1, 14))]
            s.add_request(make_req(f"r{n_added}", prompt, max_tokens=rng.randrange(1, 12)))
            n_added += 1
        for r in list(s.running) + list(s.waiting):
            if rng.random() < 0.2 and r.status == RequestStatus.RUNNING and r.num_computed_tokens == r.num_tokens - 1:
                r.spec_token_ids = [rng.randrange(3, 50) for _ in range(rng.randrange(1, 4))]
        so = s.schedule()
        assert so.total_num_scheduled_tokens <= 16
        # Emulate the KV tensor: a cache hit must see exactly the tokens the request would have computed.
        for nr in so.scheduled_new_reqs:
            toks_all = nr.prompt_token_ids + nr.output_token_ids
            for pos in range(nr.num_computed_tokens):
                assert kv_store[nr.block_ids[pos // 4]][pos % 4] == toks_all[pos]
        for rid, n in so.num_scheduled_tokens.items():
            r = s.requests[rid]
            seq = r.all_token_ids + so.scheduled_spec_decode_tokens.get(rid, [])
            table = s.kv_cache_manager.get_block_ids(rid)
            for pos in range(r.num_computed_tokens - n, r.num_computed_tokens):
                kv_store.setdefault(table[pos // 4], [None] * 4)[pos % 4] = seq[pos]
        toks = {}
        for rid, n in so.num_scheduled_tokens.items():
            r = s.requests[rid]
            if r.num_computed_tokens >= r.num_tokens:  # reached the end: sample 1 + accepted spec tokens
                spec = so.scheduled_spec_decode_tokens.get(rid, [])
                toks[rid] = spec[:rng.randrange(0, len(spec) + 1)] + [rng.randrange(2, 50)]
        out = s.update_from_output(so, runner_out(so, toks))
        done.update(o.request_id for o in out.outputs if o.finished)
        if rng.random() < 0.05 and s.running:
            done.update(o.request_id for o in s.finish_requests([s.running[0].request_id]))
        _check_invariants(s)
        for r in s.running:
            assert r.num_computed_tokens <= r.num_tokens
        if n_added == 25 and not s.has_unfinished_requests():
            break
    assert not s.has_unfinished_requests() and len(done) == 25
    assert s.kv_cache_manager.get_num_free_blocks() == 12


def test_lookahead_slots_allocated_with_drafts_and_rejected_drafts_rolled_back():
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), CacheConfig(block_size=4), 64, 64,
                  speculative=True, num_lookahead_tokens=3)
    s.add_request(make_req("a", 6, max_tokens=20))
    step(s, {"a": [20]})  # 6 prompt tokens + 3 lookahead slots (the in-worker drafter drafts after prefill): 3 blocks
    a = s.requests["a"]
    assert len(s.kv_cache_manager.get_blocks("a")) == 3
    a.spec_token_ids = [21, 22, 23]
    so = s.schedule()  # last token + 3 drafts = positions 6..9, plus 3 lookahead slots: 13 tokens -> 4 blocks
    assert so.num_scheduled_tokens == {"a": 4} and so.scheduled_spec_decode_tokens == {"a": [21, 22, 23]}
    assert len(s.kv_cache_manager.get_blocks("a")) == 4 and a.num_computed_tokens == 10
    assert s.schedule().num_scheduled_tokens == {}  # its accepted tokens are not back: no step for it yet
    out = s.update_from_output(so, runner_out(so, {"a": [21, 99]}))  # one draft accepted, then 99
    assert out.outputs[0].new_token_ids == [21, 99] and a.output_token_ids == [20, 21, 99]
    assert a.num_computed_tokens == 8 and a.num_tokens == 9  # the two rejected drafts' slots are rewritten next
    st = s.make_stats()
    assert (st.num_draft_tokens, st.num_accepted_tokens) == (3, 1)
    so = s.schedule()  # plain decode of 99 (no drafts proposed)
    assert so.num_scheduled_tokens == {"a": 1} and so.scheduled_cached_reqs[0].num_computed_tokens == 8
