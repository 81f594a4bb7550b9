"""The engine core: one scheduler + KV cache manager driving the workers, step by step.

The offline `LLM` calls it in-process; the server runs the same class in its own process behind sockets.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from typing import Protocol

from vllm_lite.config import EngineConfig
from vllm_lite.core.sched_output import ModelRunnerOutput, SchedulerOutput
from vllm_lite.core.scheduler import Scheduler
from vllm_lite.engine.messages import EngineCoreOutputs, EngineCoreRequest
from vllm_lite.model_loader import ModelInfo
from vllm_lite.request import Request, RequestStatus

logger = logging.getLogger("vllm_lite.engine")


class Executor(Protocol):
    """Runs steps on the workers (in this process, or in worker processes over sockets).

    `execute_model` launches a step without waiting for it; `get_output` returns the results of the oldest
    launched step not yet returned (waiting for it if need be). Steps complete in launch order."""

    def determine_num_blocks(self) -> int: ...

    def initialize_kv_cache(self, num_blocks: int) -> None: ...

    def execute_model(self, scheduler_output: SchedulerOutput) -> None: ...

    def get_output(self) -> ModelRunnerOutput: ...

    def shutdown(self) -> None: ...


class InProcExecutor:
    """One worker in the calling process (offline use, tests, CPU)."""

    def __init__(self, config: EngineConfig, info: ModelInfo) -> None:
        from vllm_lite.worker.worker import Worker
        self.worker = Worker(config, info)
        self.worker.load_model()

    def determine_num_blocks(self) -> int:
        return self.worker.determine_num_blocks()

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.worker.initialize_kv_cache(num_blocks)

    def execute_model(self, scheduler_output: SchedulerOutput) -> None:
        self.worker.execute_model(scheduler_output)

    def get_output(self) -> ModelRunnerOutput:
        return self.worker.get_output()

    def shutdown(self) -> None:
        pass


class EngineCore:
    def __init__(self, config: EngineConfig, info: ModelInfo, executor: Executor | None = None) -> None:
        self.config = config
        self.info = info
        t0 = time.perf_counter()
        self.executor = executor if executor is not None else InProcExecutor(config, info)
        num_blocks = self.executor.determine_num_blocks()  # waits for the workers' model load, then profiles
        self.executor.initialize_kv_cache(num_blocks)
        t1 = time.perf_counter()
        self.num_blocks = num_blocks
        self.scheduler = Scheduler(config.scheduler, config.cache, num_blocks, info.max_model_len)
        self.in_flight: deque[SchedulerOutput] = deque()
        self.max_in_flight = 2 if config.scheduler.async_scheduling else 1
        logger.info("engine ready in %.2f s (model load, profiling, KV cache of %d blocks, CUDA graphs)",
                    t1 - t0, num_blocks)

    def add_request(self, req: EngineCoreRequest) -> None:
        """Queue a request; raises ValueError (e.g. prompt longer than the context) before anything is queued."""
        request = Request(req.request_id, req.prompt_token_ids, req.sampling_params,
                          eos_token_id=req.eos_token_id, arrival_time=req.arrival_time)
        self.scheduler.add_request(request)

    def abort_requests(self, request_ids: list[str]) -> None:
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self.in_flight)

    def step(self) -> EngineCoreOutputs:
        """Launch the next step, then apply the oldest step in flight once `max_in_flight` are out (1: every step
        is launched and applied at once; 2: step N+1 is launched before step N's tokens are applied)."""
        if self.scheduler.has_unfinished_requests():
            scheduler_output = self.scheduler.schedule()
            self.executor.execute_model(scheduler_output)
            self.in_flight.append(scheduler_output)
            if len(self.in_flight) < self.max_in_flight:
                return EngineCoreOutputs(scheduler_stats=self.scheduler.make_stats())
        if not self.in_flight:
            return EngineCoreOutputs(scheduler_stats=self.scheduler.make_stats())
        return self.scheduler.update_from_output(self.in_flight.popleft(), self.executor.get_output())

    def shutdown(self) -> None:
        self.executor.shutdown()
