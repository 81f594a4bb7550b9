"""A step between its two phases (PendingStep), and a launched step on its way back (Launch): which requests sampled,
where their tokens are on the device, and how they become a ModelRunnerOutput (and the request states' tokens) once
they reach the host."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vllm_lite.protocol import ModelRunnerOutput
from vllm_lite.worker.request_state import CachedRequestState


@dataclass
class Launch:
    """One launched step. Sampled ids come back as [S, width] (width 1 without speculative tokens), -1 padded."""
    number: int
    req_ids: list[str]
    rows: list[int]  # indices into req_ids of the requests that sampled (row j of the sampled ids)
    num_drafts: list[int] | None = None  # per sampling row: draft tokens verified (None: no drafts this step)
    host: list[Any] = field(default_factory=list)  # non-blocking host copies: ids [, logprob ids, values, ranks]
    done: Any = None  # CUDA event after the copies
    num_logprobs: list[int | None] = field(default_factory=list)  # per sampling row, when logprobs were computed
    positions: list[int] = field(default_factory=list)  # per sampling row: the placeholder position (-1: none)
    row_offsets: list[int] | None = None  # per sampling row: its first logits row (None: row j is j)
    output: ModelRunnerOutput | None = None


@dataclass
class PendingStep:
    """A step between execute_model and sample_tokens: its logits (sampling rows only) and drafts."""
    launch: Launch
    logits: torch.Tensor | None = None
    states: list[CachedRequestState] = field(default_factory=list)
    drafts: torch.Tensor | None = None  # [S, K] int64, -1 padded (verification steps only)
    # The residual stream entering the model's aux hidden-state layers, [T, hidden] each (EAGLE-style heads).
    aux_hidden_states: list[torch.Tensor] = field(default_factory=list)
    # For an in-worker drafter: every request of the step, their first positions and token counts, and the final
    # hidden states [T, hidden] when the drafter reads them.
    all_states: list[CachedRequestState] = field(default_factory=list)
    starts: np.ndarray | None = None
    query_lens: np.ndarray | None = None
    hidden: torch.Tensor | None = None


def resolve_launch(launch: Launch, requests: dict[str, CachedRequestState]) -> ModelRunnerOutput:
    """Wait for a launch's sampled ids, write them into the request states, build its output (once).

    A row without drafts filled a placeholder at launch (its token may feed the next step on the device); a row
    that verified drafts appends its accepted tokens now (its request is not scheduled again before this)."""
    if launch.output is not None:
        return launch.output
    if launch.done is not None:
        launch.done.synchronize()
    sampled: list[list[int]] = [[] for _ in launch.req_ids]
    logprobs: list = [None] * len(launch.req_ids)
    if launch.rows:
        ids = launch.host[0]
        table = ids.tolist() if ids.dim() == 2 else [[t] for t in ids.tolist()]
        number = launch.number
        for j, (i, pos) in enumerate(zip(launch.rows, launch.positions)):
            row = table[j]
            tokens = row if row[-1] >= 0 else row[: row.index(-1)]
            sampled[i] = tokens
            state = requests.get(launch.req_ids[i])
            if state is None:
                continue  # finished or preempted meanwhile: the scheduler drops the tokens
            if pos < 0:
                state.append_tokens(tokens)
            elif state.pending.get(pos) == (number, j):  # else re-added since then
                state.resolve(pos, tokens[0])
        if launch.num_logprobs:
            lp = logprob_lists(*launch.host[1:])
            for j, (i, n) in enumerate(zip(launch.rows, launch.num_logprobs)):
                if n is not None:
                    first = j if launch.row_offsets is None else launch.row_offsets[j]
                    logprobs[i] = [entries[: n + 1] for entries in lp[first: first + len(sampled[i])]]
    launch.output = ModelRunnerOutput(launch.req_ids, sampled, logprobs)
    launch.host = []
    return launch.output


def logprob_lists(ids_t: torch.Tensor, vals_t: torch.Tensor, ranks_t: torch.Tensor) -> list:
    """Per row: (token, logprob, rank) with the sampled token first (its true rank), then top-N ranked 1..N."""
    rows = []
    for tid, val, rank in zip(ids_t.tolist(), vals_t.tolist(), ranks_t.tolist()):
        rows.append([(tid[0], val[0], rank)] + [(t, v, k + 1) for k, (t, v) in enumerate(zip(tid[1:], val[1:]))])
    return rows
