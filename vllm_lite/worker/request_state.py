"""What a worker remembers about each running request between steps (steps carry only diffs)."""
from __future__ import annotations

import numpy as np
import torch

from vllm_lite.protocol import NewRequestData
from vllm_lite.sampling_params import SamplingParams


class CachedRequestState:
    """Token ids (prompt + sampled), block ids and progress of one request, plus its private RNG."""

    def __init__(self, data: NewRequestData, device: torch.device) -> None:
        self.req_id = data.req_id
        self.sampling_params: SamplingParams = data.sampling_params
        self.num_prompt_tokens = len(data.prompt_token_ids)
        tokens = data.prompt_token_ids + data.output_token_ids
        self._tokens = np.zeros(max(16, 2 * len(tokens)), dtype=np.int64)
        self._tokens[: len(tokens)] = tokens
        self.num_tokens = len(tokens)
        self._blocks = np.zeros(max(16, 2 * len(data.block_ids)), dtype=np.int32)
        self._blocks[: len(data.block_ids)] = data.block_ids
        self.num_blocks = len(data.block_ids)
        self.num_computed_tokens = data.num_computed_tokens
        self.min_tokens_blocked = data.min_tokens_blocked
        # position -> (launch number, row) of tokens sampled on the device whose values are not on the host yet.
        self.pending: dict[int, tuple[int, int]] = {}
        self.generator: torch.Generator | None = None
        # In-worker drafter: the distributions [k, V] its last drafts were sampled from (None: greedy drafts).
        self.draft_probs: torch.Tensor | None = None
        if data.sampling_params.seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(data.sampling_params.seed)

    @property
    def token_ids(self) -> np.ndarray:
        """Prompt + outputs; positions still in `pending` hold stale values (their tokens are on the device)."""
        return self._tokens[: self.num_tokens]

    @property
    def token_buffer(self) -> np.ndarray:
        """The whole token buffer: token_ids, then any staged draft tokens (slice it to what is valid)."""
        return self._tokens

    @property
    def block_ids(self) -> np.ndarray:
        """The request's KV blocks in order (int32; a view, valid until add_blocks)."""
        return self._blocks[: self.num_blocks]

    def add_blocks(self, block_ids: list[int]) -> None:
        n = self.num_blocks + len(block_ids)
        if n > len(self._blocks):
            grown = np.zeros(2 * n, dtype=np.int32)
            grown[: self.num_blocks] = self._blocks[: self.num_blocks]
            self._blocks = grown
        self._blocks[self.num_blocks: n] = block_ids
        self.num_blocks = n

    @property
    def prompt_token_ids(self) -> list[int]:
        return self._tokens[: self.num_prompt_tokens].tolist()

    @property
    def output_token_ids(self) -> list[int]:
        return self._tokens[self.num_prompt_tokens: self.num_tokens].tolist()

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    def add_placeholder(self, step: int, row: int) -> int:
        """A token sampled on the device in launch `step`, row `row` of its sampled ids; `resolve` fills it.
        Returns its position."""
        self._ensure_capacity(self.num_tokens + 1)
        pos = self.num_tokens
        self.pending[pos] = (step, row)
        self.num_tokens = pos + 1
        return pos

    def _ensure_capacity(self, n: int) -> None:
        if n > len(self._tokens):
            grown = np.zeros(2 * n, dtype=np.int64)
            grown[: self.num_tokens] = self._tokens[: self.num_tokens]
            self._tokens = grown

    def stage_drafts(self, drafts: list[int]) -> None:
        """Write speculative tokens just past the known ones (not counted in num_tokens: unverified)."""
        self._ensure_capacity(self.num_tokens + len(drafts))
        self._tokens[self.num_tokens: self.num_tokens + len(drafts)] = drafts

    def append_tokens(self, tokens: list[int]) -> None:
        """Tokens that came back from verifying drafts (the accepted ones plus one)."""
        self._ensure_capacity(self.num_tokens + len(tokens))
        self._tokens[self.num_tokens: self.num_tokens + len(tokens)] = tokens
        self.num_tokens += len(tokens)

    def resolve(self, pos: int, token: int) -> None:
        self._tokens[pos] = token
        del self.pending[pos]
