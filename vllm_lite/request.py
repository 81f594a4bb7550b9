"""Engine-core view of one sequence: its tokens, progress and status."""
from __future__ import annotations

import enum
import time
from typing import Protocol

from vllm_lite.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    WAITING_FOR_FSM = 3  # queued, its grammar still compiling: the scheduler passes over it
    FINISHED_STOPPED = 4
    FINISHED_LENGTH = 5
    FINISHED_ABORTED = 6
    FINISHED_ERROR = 7  # the request itself failed (its grammar did not compile in time); stop_reason says why

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


class RequestGrammar(Protocol):
    """A request's grammar matcher as the scheduler drives it (vllm_lite.structured_output.grammar holds it)."""

    def accept_tokens(self, token_ids: list[int]) -> int:
        """Advance over the tokens in order; how many were taken (fewer than given: the grammar terminated or
        refused the next one, and the request must stop there)."""
        ...

    @property
    def is_terminated(self) -> bool: ...


class Request:
    """A single sequence (one of the `n` choices of a user request) as the scheduler tracks it."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                 eos_token_id: int | None = None, arrival_time: float | None = None,
                 max_tokens: int | None = None, extra_eos_token_ids: tuple[int, ...] = ()) -> None:
        """The stop policy is resolved here, once: `eos_token_id` (the tokenizer's EOS) stops with no stop reason,
        the model's other EOS ids and the stop_token_ids stop with the token as the reason (vLLM's semantics);
        ignore_eos drops the EOS ids; below min_tokens all of them are forbidden (`min_tokens_blocked`, which the
        worker masks)."""
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        eos = () if sampling_params.ignore_eos else (eos_token_id, *extra_eos_token_ids)
        self.eos_token_id = None if sampling_params.ignore_eos else eos_token_id
        self.stop_token_ids = frozenset(sampling_params.stop_token_ids or ()).union(
            e for e in eos[1:] if e != eos_token_id)
        self.min_tokens_blocked = sorted(self.stop_token_ids.union(e for e in eos if e is not None)) \
            if sampling_params.min_tokens else []
        self.arrival_time = time.time() if arrival_time is None else arrival_time
        # Effective cap on generated tokens (sampling max_tokens clipped to the context window).
        self.max_tokens = max_tokens if max_tokens is not None else (sampling_params.max_tokens or 1 << 30)
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1
        self.num_preemptions = 0
        self.spec_token_ids: list[int] = []
        # In a speculating engine: whether this request's next step waits for its previous one to be applied (so
        # the proposer can draft from all its tokens); False lets it run ahead with async scheduling while it has
        # nothing to draft (the engine core's draft policy sets it).
        self.spec_wait = True
        # Tokens scheduled to be sampled whose values have not come back yet (async scheduling).
        self.num_output_placeholders = 0
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.block_hashes: list[int] = []
        # Set by the engine core's structured-output manager for a request with sampling_params.structured_outputs.
        self.grammar: RequestGrammar | None = None
        # Engine-core monotonic times (vLLM's request-level histograms): queued, first scheduled, first token.
        self.queued_time: float | None = None
        self.scheduled_time: float | None = None
        self.first_token_time: float | None = None

    def timings(self) -> list[float | None]:
        """[queued, first scheduled, first token, now]: sent with the request's last output."""
        return [self.queued_time, self.scheduled_time, self.first_token_time, time.monotonic()]

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output_token_ids(self, token_ids: list[int]) -> None:
        self.output_token_ids.extend(token_ids)
        self.all_token_ids.extend(token_ids)

    @property
    def finish_reason(self) -> str | None:
        return FINISH_REASONS.get(self.status)

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.name}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens})")
