"""Front-end bookkeeping: fans a request out into `n` engine sequences and turns engine outputs into text.

Used by the offline `LLM` and the API server alike; it owns detokenization, stop strings and logprob decoding.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from vllm_lite.detokenizer import IncrementalDetokenizer
from vllm_lite.protocol import EngineCoreOutput, EngineCoreRequest
from vllm_lite.outputs import CompletionOutput, Logprob, PromptLogprobs, RequestOutput
from vllm_lite.sampling_params import SamplingParams


@dataclass
class SequenceState:
    """One of the `n` choices of a request."""
    index: int
    engine_id: str
    detokenizer: IncrementalDetokenizer | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    new_token_count: int = 0
    num_draft_tokens: int = 0  # speculative decoding: drafts verified and accepted so far
    num_accepted_tokens: int = 0

    @property
    def text(self) -> str:
        return self.detokenizer.output_text if self.detokenizer else ""


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    sequences: list[SequenceState]
    arrival_time: float
    num_cached_tokens: int = 0
    first_token_time: float | None = None
    prompt_logprobs: PromptLogprobs | None = None  # SamplingParams.prompt_logprobs, once the prompt is computed

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.sequences)

    def to_output(self) -> RequestOutput:
        outs = [CompletionOutput(s.index, s.text, list(s.token_ids), s.cumulative_logprob, s.logprobs,
                                 s.finish_reason, s.stop_reason, s.num_draft_tokens, s.num_accepted_tokens)
                for s in self.sequences]
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outs, self.finished,
                             self.num_cached_tokens, self.prompt_logprobs)


class OutputProcessor:
    def __init__(self, tokenizer: Any | None) -> None:
        """The tokenizer's EOS goes to the engine core with each request, which resolves the stop policy."""
        self.tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_token_id if tokenizer is not None else None
        self.requests: dict[str, RequestState] = {}
        self.engine_to_request: dict[str, tuple[RequestState, SequenceState]] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams) -> list[EngineCoreRequest]:
        """Register a request and return the engine requests for its `n` sequences."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        now = time.time()
        seqs, engine_reqs = [], []
        for i in range(params.n):
            engine_id = request_id if params.n == 1 else f"{i}_{request_id}"
            child = msgspec.structs.replace(params, n=1)
            if params.seed is not None and i > 0:
                child = msgspec.structs.replace(child, seed=params.seed + i)
            detok = None
            if self.tokenizer is not None:
                detok = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens,
                                               params.stop, params.include_stop_str_in_output)
            seqs.append(SequenceState(i, engine_id, detok, logprobs=[] if params.logprobs is not None else None,
                                      cumulative_logprob=0.0 if params.logprobs is not None else None))
            engine_reqs.append(EngineCoreRequest(engine_id, prompt_token_ids, child, now, self.eos_token_id))
        state = RequestState(request_id, prompt, prompt_token_ids, params, seqs, now)
        self.requests[request_id] = state
        for seq in seqs:
            self.engine_to_request[seq.engine_id] = (state, seq)
        return engine_reqs

    def engine_ids(self, request_id: str) -> list[str]:
        state = self.requests.get(request_id)
        return [s.engine_id for s in state.sequences if s.finish_reason is None] if state else []

    def process_outputs(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestState], list[str]]:
        """Apply engine outputs. Returns (requests that changed, engine ids to abort because a stop string hit)."""
        changed: dict[str, RequestState] = {}
        to_abort: list[str] = []
        now = time.time()
        for out in outputs:
            entry = self.engine_to_request.get(out.request_id)
            if entry is None:
                continue
            state, seq = entry
            if state.first_token_time is None and out.new_token_ids:
                state.first_token_time = now
            state.num_cached_tokens = max(state.num_cached_tokens, out.num_cached_tokens)
            new_ids, stop_str = out.new_token_ids, None
            if seq.detokenizer:
                seen = len(seq.detokenizer.tokens)
                stop_str = seq.detokenizer.update(new_ids)
                # A step may bring several tokens (speculative decoding): none past a stop string is kept.
                new_ids = new_ids[: len(seq.detokenizer.tokens) - seen]
            seq.token_ids.extend(new_ids)
            seq.num_draft_tokens += out.num_draft_tokens
            seq.num_accepted_tokens += out.num_accepted_tokens
            seq.new_token_count = len(new_ids)
            if seq.logprobs is not None and out.new_logprobs:
                self._add_logprobs(seq, out.new_logprobs[: len(new_ids)])
            if out.prompt_logprobs is not None and state.prompt_logprobs is None:  # n > 1: every sequence has it
                state.prompt_logprobs = [None, *map(self._logprob_dict, out.prompt_logprobs)]
            if stop_str is not None and out.finish_reason is None:
                seq.finish_reason, seq.stop_reason = "stop", stop_str
                to_abort.append(seq.engine_id)
            elif out.finish_reason is not None:
                seq.finish_reason = out.finish_reason
                seq.stop_reason = stop_str if stop_str is not None else out.stop_reason
            if seq.finish_reason is not None:
                self.engine_to_request.pop(seq.engine_id, None)
                if state.finished:
                    self.requests.pop(state.request_id, None)
            changed[state.request_id] = state
        return list(changed.values()), to_abort

    def abort_request(self, request_id: str) -> list[str]:
        """Forget a request (client gone); returns the engine ids still to abort in the engine core."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return []
        ids = []
        for seq in state.sequences:
            if seq.finish_reason is None:
                seq.finish_reason = "abort"
                ids.append(seq.engine_id)
            self.engine_to_request.pop(seq.engine_id, None)
        return ids

    def _add_logprobs(self, seq: SequenceState, new: list[list[tuple[int, float, int]]]) -> None:
        for entries in new[: len(new)]:
            seq.logprobs.append(self._logprob_dict(entries))
            seq.cumulative_logprob += entries[0][1]

    def _logprob_dict(self, entries: list[tuple[int, float, int]]) -> dict[int, Logprob]:
        """One position's [(token, logprob, rank), ...] (the chosen token first) as {token: Logprob}."""
        d: dict[int, Logprob] = {}
        for token, lp, rank in entries:
            if token not in d:
                text = self.tokenizer.decode([token]) if self.tokenizer is not None else None
                d[token] = Logprob(lp, rank, text)
        return d
