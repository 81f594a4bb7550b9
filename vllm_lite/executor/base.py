"""The interface the engine core drives, shared by the in-process and the multiprocess executors."""
from __future__ import annotations

from typing import Protocol

import numpy as np

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

    def grammar_host_buffer(self, rows: int, num_words: int) -> np.ndarray | None:
        """Where the engine core may fill the next step's grammar bitmask ([rows, num_words] int32) so that the
        worker copies it to the device without staging it (None: it uses its own array and the executor ships it)."""
        ...

    def shutdown(self) -> None: ...
