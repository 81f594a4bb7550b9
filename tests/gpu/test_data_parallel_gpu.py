"""Data parallelism on 2 GPUs: `vllm-lite serve -dp 2` puts replica 1 on GPU 1 (device offset data_parallel_rank *
tensor_parallel_size), both replicas serve requests, and the greedy outputs equal a -dp 1 server's (up to near ties)."""
from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
import torch

from server_utils import RemoteServer
from test_data_parallel import _per_engine
from tiny_models import make_tiny_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]

ARGS = ["--dtype", "float32", "--max-model-len", "256", "--seed", "0", "--gpu-memory-utilization", "0.3",
        "--enforce-eager"]
PROMPTS = [f"Question {i}: what is {i} plus {i * 3}?" for i in range(16)]


def _greedy(srv: RemoteServer, path: str) -> list[str]:
    async def run_all() -> list[str]:
        client = openai.AsyncOpenAI(base_url=srv.url_for("v1"), api_key="EMPTY", max_retries=0)
        rs = await asyncio.gather(*(client.completions.create(model=path, prompt=p, max_tokens=16, temperature=0,
                                                              extra_body={"ignore_eos": True}) for p in PROMPTS))
        await client.close()
        return [r.choices[0].text for r in rs]
    return asyncio.run(run_all())


def _used_fraction(device: int) -> float:
    free, total = torch.cuda.mem_get_info(device)
    return 1.0 - free / total


def test_dp2_one_replica_per_gpu(tmp_path):
    path = make_tiny_model(tmp_path, "qwen3", head_dim=64)
    with RemoteServer(path, ARGS) as srv:
        want = _greedy(srv, path)
    before = [_used_fraction(d) for d in (0, 1)]
    with RemoteServer(path, ARGS + ["--data-parallel-size", "2"]) as srv:
        used = [_used_fraction(d) - b for d, b in zip((0, 1), before)]
        assert min(used) > 0.2, f"each GPU should hold one replica's KV cache (~30 %): {used}"
        got = _greedy(srv, path)
        routed = _per_engine(httpx.get(srv.url_for("metrics")).text, "vllm:engine_requests_routed_total")
    assert min(routed.values()) >= len(PROMPTS) // 4
    # the replicas batch differently from one engine, so a near tie of the random model may flip on the GPU
    assert sum(g == w for g, w in zip(got, want)) >= len(PROMPTS) - 2
