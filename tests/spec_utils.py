"""Test-only speculation and grammar hooks for the engine core, and a loop that runs an EngineCore to completion.

Proposers here know the answer: `OracleProposer` drafts the reference run's next tokens (every draft must be
accepted), `WrongProposer` drafts tokens that differ from them (none may be accepted). Either way the outputs must
equal the plain run's: verification never changes what the target model produces.
"""
from __future__ import annotations

import time

import numpy as np

from vllm_lite.config import EngineConfig
from vllm_lite.engine.core import EngineCore
from vllm_lite.model_loader import resolve_model
from vllm_lite.protocol import EngineCoreRequest, GrammarOutput, SchedulerOutput
from vllm_lite.request import Request
from vllm_lite.sampling_params import SamplingParams


class OracleProposer:
    def __init__(self, reference: dict[str, list[int]]) -> None:
        self.reference = reference

    def propose(self, request: Request, k: int) -> list[int]:
        """The reference's next k tokens, while the request still follows the reference (nothing after a
        divergence: in bf16 a near tie may flip between kernels)."""
        done = len(request.output_token_ids)
        ref = self.reference[request.request_id]
        if request.output_token_ids != ref[:done]:
            return []
        return ref[done: done + k]


class WrongProposer(OracleProposer):
    def __init__(self, reference: dict[str, list[int]], vocab_size: int) -> None:
        super().__init__(reference)
        self.vocab_size = vocab_size

    def propose(self, request: Request, k: int) -> list[int]:
        right = super().propose(request, k)
        return [(t + 1) % self.vocab_size for t in right][:1] + [(t + 7) % self.vocab_size for t in right[1:]]


class AllowOnly:
    """A grammar stand-in: every constrained request may only produce tokens from `allowed`."""

    def __init__(self, allowed: set[int], vocab_size: int, constrained: set[str]) -> None:
        words = -(-vocab_size // 32)
        row = np.zeros(words * 32, dtype=np.uint8)
        row[sorted(allowed)] = 1
        self.row = np.packbits(row, bitorder="little").view(np.int32).reshape(1, words)
        self.num_words = words
        self.constrained = constrained
        self.calls = 0

    def bitmask(self, so: SchedulerOutput) -> GrammarOutput | None:
        self.calls += 1
        ids = [r for r in so.num_scheduled_tokens if r in self.constrained]
        if not ids:
            return None
        rows = [1 + len(so.scheduled_spec_decode_tokens.get(r, ())) for r in ids]
        mask = np.repeat(self.row, sum(rows), axis=0)
        return GrammarOutput(ids, rows, self.num_words, mask.tobytes())


def record_drafts(core: EngineCore) -> list[tuple[list[int], list[int]]]:
    """From now on, (the request's tokens, its drafts) for every draft an in-worker drafter returns to `core`."""
    seen: list[tuple[list[int], list[int]]] = []
    take = core.proposer.take

    def recording_take(output) -> None:
        take(output)
        for req_id, drafts in zip(output.req_ids, output.draft_token_ids or []):
            request = core.scheduler.requests.get(req_id)
            if drafts and request is not None:
                seen.append((list(request.all_token_ids), drafts))

    core.proposer.take = recording_take
    return seen


def make_core(model: str, proposer=None, grammar=None, **kwargs) -> EngineCore:
    config = EngineConfig.from_kwargs(model=model, **kwargs)
    info = resolve_model(config.model, config.load, config.device.resolved_device())
    return EngineCore(config, info, proposer=proposer, grammar=grammar)


def run_core(core: EngineCore, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
             ) -> dict[str, dict]:
    """request id -> {"tokens": [...], "logprobs": [...], "finish_reason": ...} for every prompt."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    results = {str(i): {"tokens": [], "logprobs": [], "finish_reason": None} for i in range(len(prompts))}
    for i, (p, sp) in enumerate(zip(prompts, params)):
        core.add_request(EngineCoreRequest(str(i), p, sp, time.time()))
    while core.has_unfinished_requests():
        for out in core.step().outputs:
            r = results[out.request_id]
            r["tokens"] += out.new_token_ids
            r["logprobs"] += out.new_logprobs or []
            if out.finish_reason:
                r["finish_reason"] = out.finish_reason
    return results
