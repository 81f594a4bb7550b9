"""One rank: its device, its model runner, and the typed calls the executor makes to it.

Both executors drive ranks through `handle`: the in-process one calls it directly, the multiprocess one decodes a
message from the socket and calls it in the worker process. Nothing here assumes it is the only rank: rank, world
size and device index come from its RankConfig. With tensor_parallel_size > 1 the ranks join one torch.distributed
group here (at the init method the executor chose for the engine) and each loads its shard of the model.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import torch

from vllm_lite.config import EngineConfig, RankConfig
from vllm_lite.distributed import destroy_tensor_parallel, init_tensor_parallel
from vllm_lite.model_loader import ModelInfo
from vllm_lite.protocol import DetermineNumBlocks, InitializeKVCache, SampleTokens, SchedulerOutput
from vllm_lite.worker.model_runner import ModelRunner

logger = logging.getLogger("vllm_lite.worker")


class Worker:
    def __init__(self, config: EngineConfig, info: ModelInfo, rank: RankConfig) -> None:
        self.rank = rank
        device = config.device.resolved_device()
        self.device = torch.device(f"cuda:{rank.device_index}") if device == "cuda" else torch.device("cpu")
        start = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.empty(1, device=self.device)  # create the CUDA context now, so its cost shows up here
            logger.info("rank %d: CUDA context on %s in %.2f s", rank.rank, self.device, time.perf_counter() - start)
        tp_size = config.parallel.tensor_parallel_size
        if tp_size > 1 and rank.world_size != tp_size:
            raise ValueError(f"rank {rank.rank}: world size {rank.world_size} != tensor_parallel_size {tp_size}")
        # tensor_parallel_size 1 with several ranks (tests) replicates the model: no group, no collective.
        self.tp = init_tensor_parallel(rank.rank, tp_size, config.parallel.distributed_init_method, self.device)
        self.runner = ModelRunner(config, info, self.device, self.tp)
        self.runner.load_model()

    def shutdown(self) -> None:
        destroy_tensor_parallel(self.tp)

    def handle(self, call: Any) -> Any:
        """Run one call; returns its result (None for the step calls: their outputs come from runner.get_output)."""
        runner = self.runner
        if isinstance(call, SchedulerOutput):  # ExecuteModel is a SchedulerOutput
            return runner.execute_model(call)
        if isinstance(call, SampleTokens):
            return runner.sample_tokens(call.grammar)
        if isinstance(call, DetermineNumBlocks):
            return runner.determine_num_blocks()
        if isinstance(call, InitializeKVCache):
            return runner.initialize_kv_cache(call.num_blocks)
        raise TypeError(f"rank {self.rank.rank}: unknown call {type(call).__name__}")

