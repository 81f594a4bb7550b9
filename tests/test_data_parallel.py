"""Data parallelism: `vllm-lite serve -dp 2` (two engine-core replicas behind one API server, CPU, tiny random
llama) gives the offline engine's greedy outputs for concurrent requests, spreads them over both replicas (per-
replica series in /metrics), sums the scheduler metrics, and fails in-flight requests + turns /health 503 when one
replica's engine core dies, leaving no process behind. Plus the routing/stat rules and the offline refusal."""
from __future__ import annotations

import asyncio
import re
import signal

import httpx
import openai
import pytest

from server_utils import RemoteServer, alive, children, cmdline, kill_midstream, serve_tiny_llama, wait_gone
from tiny_models import make_tiny_model
from vllm_lite.engine.dp_client import sum_stats
from vllm_lite.protocol import SchedulerStats

SERVER_ARGS = ["--device", "cpu", "--dtype", "float32", "--max-model-len", "1024", "--seed", "0",
               "--data-parallel-size", "2"]
LONG = 1000  # streams that cannot finish before the test acts on them (a kill, a SIGTERM), even on a fast CPU
PROMPTS = [f"Question {i}: what is {i} plus {i * 3}?" for i in range(12)]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    yield from serve_tiny_llama(tmp_path_factory, "dp-server", SERVER_ARGS)


def _engine_cores(srv: RemoteServer) -> list[int]:
    """The server's spawned children that have workers of their own, oldest (replica 0, spawned first) first."""
    spawned = [c for c in children(srv.pid) if "resource_tracker" not in cmdline(c)]
    return sorted(c for c in spawned if children(c))


def _series(text: str, name: str) -> dict[str, float]:
    """label set -> value of every sample of `name`."""
    return {m.group(1) or "": float(m.group(2))
            for m in re.finditer(rf"^{re.escape(name)}(?:{{([^}}]*)}})? (\S+)$", text, re.M)}


def _per_engine(text: str, name: str) -> dict[str, float]:
    """The `engine` label -> value of every sample of `name`."""
    return {re.search(r'engine="(\d+)"', labels).group(1): v for labels, v in _series(text, name).items()}


def test_dp2_greedy_equals_offline_and_spreads_load(served):
    from vllm_lite import LLM, SamplingParams
    path, srv = served
    assert len(_engine_cores(srv)) == 2

    async def run_all():
        aclient = openai.AsyncOpenAI(base_url=srv.url_for("v1"), api_key="EMPTY", max_retries=0)
        rs = await asyncio.gather(*(aclient.completions.create(model=path, prompt=p, max_tokens=12, temperature=0,
                                                               extra_body={"ignore_eos": True}) for p in PROMPTS))
        await aclient.close()
        return rs

    results = asyncio.run(run_all())
    want = LLM(path, device="cpu", dtype="float32", max_model_len=128, seed=0).generate(
        PROMPTS, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    assert [r.choices[0].text for r in results] == [w.outputs[0].text for w in want]
    text = httpx.get(srv.url_for("metrics")).text
    routed = _per_engine(text, "vllm:engine_requests_routed_total")
    assert set(routed) == {"0", "1"}
    assert sum(routed.values()) == len(PROMPTS) and min(routed.values()) >= len(PROMPTS) // 3
    assert set(_series(text, "vllm:engine_outstanding_tokens").values()) == {0.0}  # all done
    # totals keep one series (model_name only); tokens counted once over both replicas
    assert list(_series(text, "vllm:num_requests_running")) == ['model_name="%s"' % path]
    assert _series(text, "vllm:generation_tokens_total") == {'model_name="%s"' % path: 12.0 * len(PROMPTS)}
    assert _series(text, "vllm:engine_healthy") == {'model_name="%s"' % path: 1.0}


def test_replica_death_fails_requests_and_exits(served):
    """Two streams, one per replica (routing: the first goes to replica 0, the second to the emptier replica 1);
    replica 1's engine core is killed: both fail, /health is 503, the server exits, nothing is left."""
    path, srv = served
    tree = srv.tree()
    cores = _engine_cores(srv)
    client = openai.OpenAI(base_url=srv.url_for("v1"), api_key="EMPTY", max_retries=0, timeout=30)
    before = _per_engine(httpx.get(srv.url_for("metrics")).text, "vllm:engine_requests_routed_total")
    streams = [iter(client.completions.create(model=path, prompt="Hello", max_tokens=LONG, stream=True,
                                              extra_body={"ignore_eos": True})) for _ in range(2)]
    for it in streams:
        next(it)
    after = _per_engine(httpx.get(srv.url_for("metrics")).text, "vllm:engine_requests_routed_total")
    assert {k: after[k] - before[k] for k in after} == {k: 1.0 for k in before}
    r = kill_midstream(srv, cores[1], streams)
    assert r.status_code == 503 and "replica" in r.text
    assert srv.proc.wait(30) != 0
    assert wait_gone(tree, 15) == [], "processes left behind after a replica died"
    assert not alive(cores[0])


def test_sigterm_stops_every_replica(tmp_path):
    """SIGTERM with a stream in flight on each replica: both end with finish_reason "abort", the server exits 0
    and neither replica's engine core nor its worker is left."""
    path = make_tiny_model(tmp_path, "llama")
    with RemoteServer(path, SERVER_ARGS) as srv:
        tree = srv.tree()
        assert len(_engine_cores(srv)) == 2
        client = openai.OpenAI(base_url=srv.url_for("v1"), api_key="EMPTY", max_retries=0, timeout=30)
        streams = [iter(client.completions.create(model=path, prompt="Hello", max_tokens=LONG, stream=True,
                                                  extra_body={"ignore_eos": True})) for _ in range(2)]
        for it in streams:
            next(it)
        srv.proc.send_signal(signal.SIGTERM)
        finishes = [[c.choices[0].finish_reason for c in it if c.choices][-1] for it in streams]
        assert finishes == ["abort", "abort"]
        assert srv.proc.wait(30) == 0
        assert wait_gone(tree, 15) == [], "processes left behind after SIGTERM"


def test_sum_stats():
    a = SchedulerStats(num_running_reqs=2, kv_cache_usage=0.5, prefix_cache_hits=3, num_accepted_tokens_per_pos=[4])
    b = SchedulerStats(num_running_reqs=1, kv_cache_usage=0.1, prefix_cache_hits=1,
                       num_accepted_tokens_per_pos=[1, 2])
    total = sum_stats([a, b])
    assert total.num_running_reqs == 3 and total.prefix_cache_hits == 4
    assert total.kv_cache_usage == pytest.approx(0.3) and total.num_accepted_tokens_per_pos == [5, 2]


def test_offline_llm_refuses_data_parallel():
    from vllm_lite import LLM
    with pytest.raises(ValueError, match="--data-parallel-size"):
        LLM("unused-model", device="cpu", data_parallel_size=2)
