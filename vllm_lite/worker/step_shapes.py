"""The step shapes a model runner prepares for: CUDA-graph batch sizes and tokens per request, and how many requests
its input stager holds. One place, because speculative decoding changes all three together."""
from __future__ import annotations

from dataclasses import dataclass

from vllm_lite.compile.cuda_graphs import (default_capture_sizes, graph_token_sizes, prefill_capture_sizes,
                                          prefill_slot_counts)
from vllm_lite.config import EngineConfig

MAX_ROW_REQUESTS = 256  # verify_as_decode: most tokens of a verification step staged as requests of their own


@dataclass(frozen=True)
class StepShapes:
    capture_sizes: list[int]  # decode-graph batch sizes (requests)
    graph_query_lens: tuple[int, ...]  # tokens per request captured: 1, and 1 + k for verification steps
    stager_requests: int  # requests (or, with verify_as_decode, tokens as requests) one step may stage
    prefill_sizes: list[int]  # token counts of the prefill graphs (empty: none)
    prefill_slots: list[int]  # their request-slot counts: 1, 2, 4, ... up to DeviceConfig.prefill_graph_requests

    def graph_token_sizes(self) -> dict[int, list[int]]:
        """Token counts of the graphs these shapes capture, by graph key (compile/cuda_graphs.py)."""
        return graph_token_sizes(self.capture_sizes, self.graph_query_lens, self.prefill_sizes, self.prefill_slots)


def step_shapes(config: EngineConfig, num_spec_tokens: int, block_size: int) -> StepShapes:
    """Verification steps replay graphs of 1 + k tokens per request (padding requests keep those in one block, so
    not when k >= block_size); with KernelConfig.verify_as_decode they run as decode steps of one row per token
    instead, so the decode graphs (and the stager) cover up to (1 + k) x max_num_seqs rows, at most
    MAX_ROW_REQUESTS."""
    seqs = config.scheduler.max_num_seqs
    query_lens = (1, 1 + num_spec_tokens) if 0 < num_spec_tokens < block_size else (1,)
    rows = seqs
    if num_spec_tokens and config.kernels.verify_as_decode:
        query_lens = (1,)
        rows = max(seqs, min(seqs * (1 + num_spec_tokens), MAX_ROW_REQUESTS))
    prefill_tokens = min(config.device.max_prefill_graph_tokens, config.scheduler.max_num_batched_tokens)
    return StepShapes(default_capture_sizes(rows, config.device.max_cudagraph_capture_size), query_lens, rows,
                      prefill_capture_sizes(prefill_tokens) if prefill_tokens >= 16 else [],
                      prefill_slot_counts(min(config.device.prefill_graph_requests, seqs)))
