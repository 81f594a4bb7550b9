"""The interface the engine core drives, shared by the in-process and the multiprocess executors."""
from __future__ import annotations

from typing import Protocol

from vllm_lite.protocol import GrammarOutput, ModelRunnerOutput, SchedulerOutput


class Executor(Protocol):
    """Runs steps on all ranks. A step is two calls, both non-blocking: `execute_model` launches the forward, then
    `sample_tokens` samples it (with the grammar bitmask the engine core built meanwhile). `get_output` returns the
    oldest sampled step's results from rank 0, waiting for them if need be; steps complete in launch order."""

    def determine_num_blocks(self) -> int: ...

    def initialize_kv_cache(self, num_blocks: int) -> None: ...

    def execute_model(self, scheduler_output: SchedulerOutput) -> None: ...

    def sample_tokens(self, grammar_output: GrammarOutput | None) -> None: ...

    def get_output(self) -> ModelRunnerOutput: ...

    def shutdown(self) -> None: ...
