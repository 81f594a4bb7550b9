"""What the scheduler tells the workers each step (msgspec Structs: they cross the engine-core -> worker socket).

New requests travel in full once; running requests travel as diffs. A preempted request that resumes travels as
a new request again (with its output tokens so far), so workers never need to reconcile stale state.
"""
from __future__ import annotations

import msgspec

from vllm_lite.sampling_params import SamplingParams


class NewRequestData(msgspec.Struct, array_like=True):
    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int


class CachedRequestData(msgspec.Struct, array_like=True):
    req_id: str
    new_block_ids: list[int]
    num_computed_tokens: int


class SchedulerOutput(msgspec.Struct, array_like=True):
    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: list[CachedRequestData]
    # req_id -> number of tokens computed this step (prefill chunk length, 1 for decode, 1 + k with spec tokens).
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    # req_id -> speculative tokens to verify this step (already counted in num_scheduled_tokens).
    scheduled_spec_decode_tokens: dict[str, list[int]]
    # Requests finished or preempted since the last step: workers drop their state.
    finished_req_ids: list[str]


class ModelRunnerOutput(msgspec.Struct, array_like=True):
    """One step's results, in the order of `req_ids`; requests still in a partial prefill get no token."""
    req_ids: list[str]
    sampled_token_ids: list[list[int]]
    # Per request (None when not asked): per sampled token, [(token_id, logprob, rank)...], sampled token first.
    logprobs: list[list[list[tuple[int, float, int]]] | None]
