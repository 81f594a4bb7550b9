"""Executors: the multiprocess executor starts N worker processes (one per rank), broadcasts each typed call to all
of them and reads results from rank 0; the in-process executor has the same interface. Two replicated CPU ranks
produce the in-process engine's outputs, and the death of any rank surfaces as an error instead of a hang."""
from __future__ import annotations

import time

import msgspec
import pytest

from vllm_lite.config import EngineConfig
from vllm_lite.engine.core import EngineCore
from vllm_lite.executor.multiproc import MultiprocExecutor, WorkerDiedError
from vllm_lite.model_loader import ModelInfo, resolve_model
from vllm_lite.protocol import (WORKER_CALL_DECODER, DetermineNumBlocks, InitializeKVCache,
                                SampleTokens, SchedulerOutput, encode)
from vllm_lite.sampling_params import SamplingParams

from spec_utils import run_core

PROMPTS = [[5, 17, 99, 3, 250, 7, 8], [300, 2], [11, 12, 13, 14, 15, 16, 17, 18, 19]]


def _config(path: str, **kw) -> EngineConfig:
    return EngineConfig.from_kwargs(model=path, device="cpu", dtype="float32", max_model_len=128, block_size=4, **kw)


def test_worker_calls_are_typed_structs():
    so = SchedulerOutput([], [], {}, 0, {}, [])
    for call in (DetermineNumBlocks(), InitializeKVCache(7), so, SampleTokens()):
        decoded = WORKER_CALL_DECODER.decode(encode(call))
        assert isinstance(decoded, type(call)) or isinstance(decoded, SchedulerOutput)
    assert WORKER_CALL_DECODER.decode(encode(InitializeKVCache(7))).num_blocks == 7
    with pytest.raises(msgspec.ValidationError):  # a method-name string is not a call
        WORKER_CALL_DECODER.decode(msgspec.msgpack.encode(["determine_num_blocks", []]))


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_two_ranks_match_the_in_process_engine(tiny_qwen2_path, tmp_path, async_scheduling):
    config = _config(tiny_qwen2_path, async_scheduling=async_scheduling)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=1)
    info = resolve_model(config.model, config.load, "cpu")
    want = run_core(EngineCore(config, info), PROMPTS, params)
    executor = MultiprocExecutor(config, str(tmp_path), world_size=2)
    try:
        desc, _ = executor.wait_model_description()
        core = EngineCore(config, ModelInfo.from_description(desc), executor)
        got = run_core(core, PROMPTS, params)
        assert all(p.is_alive() for p in executor.procs) and len(executor.procs) == 2
    finally:
        executor.shutdown()
    assert got == want
    assert not any(p.is_alive() for p in executor.procs)


def test_death_of_a_non_zero_rank_is_an_error(tiny_qwen2_path, tmp_path):
    config = _config(tiny_qwen2_path)
    executor = MultiprocExecutor(config, str(tmp_path), world_size=2)
    try:
        desc, _ = executor.wait_model_description()
        core = EngineCore(config, ModelInfo.from_description(desc), executor)
        executor.procs[1].kill()
        start = time.monotonic()
        with pytest.raises(WorkerDiedError, match="worker process 1"):
            run_core(core, PROMPTS, SamplingParams(max_tokens=5))
        assert time.monotonic() - start < 10
    finally:
        executor.shutdown()


def test_worker_pushes_each_output_unasked(tiny_qwen2_path, tmp_path):
    """The worker sends a sampled step's output as soon as it is ready, before the engine core's next call: with
    async scheduling the first step() only launches, and its output must already be on its way back (the engine
    core applies one step while the worker prepares the next, instead of the two taking turns)."""
    from vllm_lite.protocol import EngineCoreRequest
    config = _config(tiny_qwen2_path, async_scheduling=True)
    executor = MultiprocExecutor(config, str(tmp_path))
    try:
        desc, _ = executor.wait_model_description()
        core = EngineCore(config, ModelInfo.from_description(desc), executor)
        core.add_request(EngineCoreRequest("0", PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=4), 0.0))
        assert core.step().outputs == [] and len(core.in_flight) == 1  # launched, not applied
        assert executor.from_workers[0].poll(10_000), "no output pushed for the launched step"
        tokens = []
        while core.has_unfinished_requests():
            tokens += [t for out in core.step().outputs for t in out.new_token_ids]
    finally:
        executor.shutdown()
    want = run_core(EngineCore(config, resolve_model(config.model, config.load, "cpu")), [PROMPTS[0]],
                    SamplingParams(temperature=0.0, max_tokens=4))
    assert tokens == want["0"]["tokens"] and len(tokens) == 4
