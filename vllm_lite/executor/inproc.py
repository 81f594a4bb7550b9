"""One rank in the calling process (the offline LLM, tests, CPU): the executor interface without sockets."""
from __future__ import annotations

import numpy as np

from vllm_lite.config import EngineConfig, RankConfig
from vllm_lite.model_loader import ModelInfo
from vllm_lite.protocol import GrammarOutput, ModelRunnerOutput, SchedulerOutput
from vllm_lite.worker.model_runner import ModelRunner
from vllm_lite.worker.worker import Worker


class InProcExecutor:
    def __init__(self, config: EngineConfig, info: ModelInfo) -> None:
        if config.parallel.world_size != 1:
            raise ValueError("the in-process executor runs one rank; use the multiprocess executor for more")
        self.worker = Worker(config, info, RankConfig())

    @property
    def runner(self) -> ModelRunner:
        """Rank 0's model runner (benchmarks and tests read its model and device)."""
        return self.worker.runner

    def determine_num_blocks(self) -> int:
        return self.worker.runner.determine_num_blocks()

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.worker.runner.initialize_kv_cache(num_blocks)

    def execute_model(self, scheduler_output: SchedulerOutput) -> None:
        self.worker.runner.execute_model(scheduler_output)

    def sample_tokens(self, grammar_output: GrammarOutput | None) -> None:
        self.worker.runner.sample_tokens(grammar_output)

    def get_output(self) -> ModelRunnerOutput:
        return self.worker.runner.get_output()

    def grammar_host_buffer(self, rows: int, num_words: int) -> np.ndarray | None:
        """The worker's pinned staging memory (CUDA): same process, so the mask need not be copied into it."""
        return self.worker.runner.grammar_bitmask.host_buffer(rows, num_words)

    def shutdown(self) -> None:
        pass
