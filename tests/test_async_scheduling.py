"""Async scheduling: step N+1 is scheduled before step N's tokens are back. Exact scheduler states with output
placeholders (late stops, max_tokens, preemption while a token is in flight), and whole-engine outputs identical
to synchronous scheduling for every sampling feature."""
from __future__ import annotations

import pytest

from vllm_lite import LLM, SamplingParams
from vllm_lite.request import RequestStatus

from test_scheduler import make_req, make_sched, runner_out


def test_decode_is_scheduled_on_a_placeholder():
    s = make_sched()
    s.add_request(make_req("a", 5, max_tokens=10))
    so1 = s.schedule()  # prefill: samples -> one placeholder
    a = s.requests["a"]
    assert so1.num_scheduled_tokens == {"a": 5} and (a.num_computed_tokens, a.num_output_placeholders) == (5, 1)
    so2 = s.schedule()  # decode of the token still in flight (not a speculative token)
    assert so2.num_scheduled_tokens == {"a": 1} and so2.scheduled_spec_decode_tokens == {}
    assert so2.scheduled_cached_reqs[0].num_computed_tokens == 5
    assert (a.num_computed_tokens, a.num_output_placeholders, a.num_tokens) == (6, 2, 5)
    out = s.update_from_output(so1, runner_out(so1, {"a": [30]}))
    assert [o.new_token_ids for o in out.outputs] == [[30]]
    assert (a.num_output_placeholders, a.output_token_ids) == (1, [30])
    s.update_from_output(so2, runner_out(so2, {"a": [31]}))
    assert (a.num_output_placeholders, a.output_token_ids, a.num_computed_tokens) == (0, [30, 31], 6)


def test_max_tokens_stops_scheduling_before_the_tokens_are_back():
    s = make_sched()
    s.add_request(make_req("a", 4, max_tokens=2))
    so1, so2 = s.schedule(), s.schedule()
    so3 = s.schedule()  # both outputs are in flight: the request is complete, nothing more to compute
    assert so2.num_scheduled_tokens == {"a": 1} and so3.num_scheduled_tokens == {}
    s.update_from_output(so1, runner_out(so1, {"a": [30]}))
    out = s.update_from_output(so2, runner_out(so2, {"a": [31]}))
    assert out.outputs[0].finish_reason == "length" and out.outputs[0].new_token_ids == [31]
    assert not s.has_unfinished_requests() and s.kv_cache_manager.get_num_free_blocks() == 64


def test_eos_seen_one_step_late_drops_the_extra_step():
    s = make_sched()
    s.add_request(make_req("a", 4, max_tokens=10))
    s.add_request(make_req("b", 4, max_tokens=10))
    so1, so2 = s.schedule(), s.schedule()
    out = s.update_from_output(so1, runner_out(so1, {"a": [2], "b": [40]}))  # a samples EOS
    assert {o.request_id: o.finish_reason for o in out.outputs} == {"a": "stop", "b": None}
    assert "a" not in s.requests and s.kv_cache_manager.get_block_ids("a") == []
    so3 = s.schedule()
    assert so3.finished_req_ids == ["a"] and so3.num_scheduled_tokens == {"b": 1}
    out = s.update_from_output(so2, runner_out(so2, {"a": [77], "b": [41]}))  # a's extra token is dropped
    assert [(o.request_id, o.new_token_ids) for o in out.outputs] == [("b", [41])]
    assert s.requests["b"].output_token_ids == [40, 41]


def test_preempted_while_its_token_is_in_flight():
    s = make_sched(num_blocks=4, block_size=4, max_model_len=16, caching=False)
    s.add_request(make_req("a", 8, max_tokens=3))
    s.add_request(make_req("b", 7, max_tokens=5))
    so1 = s.schedule()  # a: blocks 0,1; b: blocks 2,3 (b's prompt fills 7 of 8 slots)
    so2 = s.schedule()  # a needs a 3rd block -> b (last running) is preempted with its first token in flight
    b = s.requests["b"]
    assert so2.num_scheduled_tokens == {"a": 1} and so2.finished_req_ids == ["b"]
    assert (b.status, b.num_computed_tokens, b.num_output_placeholders) == (RequestStatus.PREEMPTED, 0, 1)
    so3 = s.schedule()  # b waits for its token before it may resume
    assert so3.num_scheduled_tokens == {"a": 1} and not so3.scheduled_new_reqs
    s.update_from_output(so1, runner_out(so1, {"a": [30], "b": [40]}))
    assert (b.output_token_ids, b.num_output_placeholders, b.status) == ([40], 0, RequestStatus.PREEMPTED)
    s.update_from_output(so2, runner_out(so2, {"a": [31]}))
    out = s.update_from_output(so3, runner_out(so3, {"a": [32]}))
    assert out.outputs[0].finish_reason == "length"
    so4 = s.schedule()
    assert so4.num_scheduled_tokens == {"b": 8}
    nb = so4.scheduled_new_reqs[0]
    assert (nb.req_id, nb.output_token_ids, nb.num_computed_tokens) == ("b", [40], 0)


def test_preempted_request_that_stops_on_its_in_flight_token_leaves_the_queue():
    s = make_sched(num_blocks=4, block_size=4, max_model_len=16, caching=False)
    s.add_request(make_req("a", 8, max_tokens=3))
    s.add_request(make_req("b", 7, max_tokens=5))
    so1, so2 = s.schedule(), s.schedule()
    assert s.requests["b"].status == RequestStatus.PREEMPTED
    out = s.update_from_output(so1, runner_out(so1, {"a": [30], "b": [2]}))
    assert {o.request_id: o.finish_reason for o in out.outputs} == {"a": None, "b": "stop"}
    assert "b" not in s.requests and not s.waiting


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_models import make_tiny_model
    return make_tiny_model(tmp_path_factory.mktemp("async"), "qwen3")


SAMPLING = {
    "seeded": dict(temperature=1.0, top_k=20, top_p=0.9, seed=7, max_tokens=24),
    "penalties": dict(temperature=0.0, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.4,
                      max_tokens=24, ignore_eos=True),
    "min_tokens": dict(temperature=0.8, seed=3, min_tokens=10, max_tokens=24, stop_token_ids=[5, 6, 7]),
    "stop_string": dict(temperature=0.0, max_tokens=40, stop=["o"]),
    "logprobs_n2": dict(temperature=1.0, seed=11, n=2, logprobs=3, max_tokens=16),
}


@pytest.mark.parametrize("name", list(SAMPLING))
def test_async_equals_sync(tiny, name):
    prompts = ["Hello world", "The quick brown fox", "def add(a, b):", "Once upon a time there was"]
    params = SamplingParams(**SAMPLING[name])
    results = []
    for async_scheduling in (False, True):
        llm = LLM(tiny, device="cpu", dtype="float32", max_model_len=128, block_size=4, num_gpu_blocks_override=40,
                  async_scheduling=async_scheduling)
        results.append(llm.generate(prompts, params, use_tqdm=False))
    for sync_out, async_out in zip(*results):
        for a, b in zip(sync_out.outputs, async_out.outputs):
            assert (a.token_ids, a.text, a.finish_reason, a.stop_reason) == \
                (b.token_ids, b.text, b.finish_reason, b.stop_reason)
            if a.logprobs is not None:
                assert [{t: lp.logprob for t, lp in e.items()} for e in a.logprobs] == \
                    [{t: lp.logprob for t, lp in e.items()} for e in b.logprobs]


def test_generate_returns_with_nothing_in_flight(tiny):
    llm = LLM(tiny, device="cpu", dtype="float32", max_model_len=128)
    outs = llm.generate(["Hello world", "def add(a, b):"], SamplingParams(temperature=0.0, max_tokens=5, stop=["o"]),
                        use_tqdm=False)
    assert all(o.finished for o in outs)
    assert not llm.engine.in_flight and not llm.engine.has_unfinished_requests()
