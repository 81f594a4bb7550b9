"""User-facing results of the offline API, shaped like vLLM's."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


SampleLogprobs = list[dict[int, Logprob]]
# vLLM's shape: None for the first prompt token (nothing predicts it), then {token_id: Logprob} per prompt token
# holding that token and the top-N at its position
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: SampleLogprobs | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    # Speculative decoding: draft tokens this sequence verified, and of those accepted by the target
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0
    prompt_logprobs: PromptLogprobs | None = None
    metrics: dict = field(default_factory=dict)

    @property
    def num_accepted_tokens(self) -> int:
        """Draft tokens the target accepted for this request (all its `n` sequences; 0 without speculation)."""
        return sum(o.num_accepted_tokens for o in self.outputs)

    @property
    def num_draft_tokens(self) -> int:
        """Draft tokens verified for this request (all its sequences)."""
        return sum(o.num_draft_tokens for o in self.outputs)
