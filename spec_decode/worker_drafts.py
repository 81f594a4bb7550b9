"""The engine core's view of an in-worker drafter (draft model, EAGLE): the drafts came back with a step's output.

EngineCore hands each applied step's ModelRunnerOutput to `take`; its draft policy then asks `propose` for a
request's drafts exactly as it asks an n-gram proposer, so the adaptive length, min_tokens and bad-word rules apply
alike.
"""
from __future__ import annotations

from typing import Any

from vllm_lite.protocol import ModelRunnerOutput


class WorkerDrafts:
    def __init__(self) -> None:
        self._drafts: dict[str, list[int]] = {}

    def take(self, output: ModelRunnerOutput) -> None:
        """The drafts the worker proposed after this output's step (they replace older ones)."""
        drafts = output.draft_token_ids or []
        self._drafts = {r: d for r, d in zip(output.req_ids, drafts) if d}

    def propose(self, request: Any, max_tokens: int) -> list[int]:
        return self._drafts.get(request.request_id, [])[:max_tokens]
