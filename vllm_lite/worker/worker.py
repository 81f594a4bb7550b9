"""A worker owns one device: it picks the device, loads the model and runs steps through its ModelRunner."""
from __future__ import annotations

import logging
import time

import torch

from vllm_lite.config import EngineConfig
from vllm_lite.core.sched_output import ModelRunnerOutput, SchedulerOutput
from vllm_lite.model_loader import ModelInfo
from vllm_lite.worker.model_runner import ModelRunner

logger = logging.getLogger("vllm_lite.worker")


class Worker:
    def __init__(self, config: EngineConfig, info: ModelInfo, rank: int = 0) -> None:
        device = config.device.resolved_device()
        self.device = torch.device(f"cuda:{rank}") if device == "cuda" else torch.device("cpu")
        start = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.empty(1, device=self.device)  # create the CUDA context now, so its cost shows up here
            logger.info("CUDA context on %s in %.2f s", self.device, time.perf_counter() - start)
        start = time.perf_counter()
        self.runner = ModelRunner(config, info, self.device)
        logger.info("model runner (attention backend, input buffers) set up in %.2f s", time.perf_counter() - start)

    def load_model(self) -> None:
        self.runner.load_model()

    def determine_num_blocks(self) -> int:
        return self.runner.determine_num_blocks()

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.runner.initialize_kv_cache(num_blocks)

    def execute_model(self, scheduler_output: SchedulerOutput) -> None:
        self.runner.execute_model(scheduler_output)

    def get_output(self) -> ModelRunnerOutput:
        return self.runner.get_output()
