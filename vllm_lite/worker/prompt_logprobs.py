"""Prompt logprobs (SamplingParams.prompt_logprobs, vLLM's field): the logprob of every prompt token after the first
under the model, plus the top-N at each position; what lm-eval's loglikelihood tasks read through the server's
`echo=true`. The runner samples only at the last row of a request; the rows before it, which produce nothing
otherwise, are turned into logprobs here, chunk by chunk across a chunked prefill, and the whole list is sent with
the step that samples the request's first token. Nothing runs unless a request asks (`active` is empty)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from vllm_lite.protocol import ModelRunnerOutput, NewRequestData

# [(prompt token, logprob, rank), (top-1 id, logprob, 1), ...] per prompt position after the first
Entries = list[list[tuple[int, float, int]]]
ROWS_PER_CHUNK = 512  # logits rows at once: bounds the [rows, vocab] float32 temporaries


@dataclass
class _Partial:
    num: int
    prompt: np.ndarray
    entries: Entries = field(default_factory=list)


class PromptLogprobsCollector:
    def __init__(self) -> None:
        self.active: dict[str, _Partial] = {}
        self._done: dict[int, dict[str, Entries]] = {}  # launch number -> req_id -> entries

    def add(self, data: NewRequestData) -> None:
        """A request arriving (or resuming after preemption): collect from its first prompt token, unless it
        already has outputs (its prompt logprobs went out with its first token)."""
        num = data.sampling_params.prompt_logprobs
        if num is None or data.output_token_ids:
            self.active.pop(data.req_id, None)
            return
        if data.num_computed_tokens:
            raise ValueError(f"request {data.req_id!r} asks for prompt logprobs but {data.num_computed_tokens} "
                             f"prompt tokens were not computed (prefix cache hits must be skipped for it)")
        self.active[data.req_id] = _Partial(num, np.asarray(data.prompt_token_ids, dtype=np.int64))

    def drop(self, req_id: str) -> None:
        self.active.pop(req_id, None)

    def collect(self, launch: int, hidden: torch.Tensor, req_ids: list[str], starts: np.ndarray,
                query_lens: np.ndarray, compute_logits: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Logprobs of the prompt tokens predicted by this step's rows (row at position p predicts token p + 1);
        a request whose prompt is complete in this step moves to launch `launch`'s results."""
        offsets = np.concatenate(([0], np.cumsum(query_lens)))
        for i, req_id in enumerate(req_ids):
            part = self.active.get(req_id)
            if part is None:
                continue
            start, n, plen = int(starts[i]), int(query_lens[i]), len(part.prompt)
            stop = min(start + n, plen - 1)  # the last prompt position samples the first output instead
            if stop > start:
                rows = hidden[int(offsets[i]): int(offsets[i]) + stop - start]
                targets = torch.from_numpy(part.prompt[start + 1: stop + 1]).to(hidden.device)
                part.entries.extend(_logprobs(rows, targets, part.num, compute_logits))
            if start + n >= plen:
                if len(part.entries) != plen - 1:
                    raise RuntimeError(f"request {req_id!r}: {len(part.entries)} prompt logprobs for a prompt of "
                                       f"{plen} tokens")
                self._done.setdefault(launch, {})[req_id] = part.entries
                del self.active[req_id]

    def attach(self, launch: int, output: ModelRunnerOutput) -> None:
        """Put the prompt logprobs completed in `launch` on its output (the step of their first token)."""
        done = self._done.pop(launch, None)
        if done:
            output.prompt_logprobs = done


def _logprobs(rows: torch.Tensor, targets: torch.Tensor, num: int,
              compute_logits: Callable[[torch.Tensor], torch.Tensor]) -> Entries:
    out: Entries = []
    for lo in range(0, rows.shape[0], ROWS_PER_CHUNK):
        logprobs = compute_logits(rows[lo: lo + ROWS_PER_CHUNK]).float().log_softmax(dim=-1)
        tgt = targets[lo: lo + ROWS_PER_CHUNK].view(-1, 1)
        tok_lp = logprobs.gather(1, tgt)
        ranks = ((logprobs > tok_lp).sum(dim=-1) + 1).tolist()  # vLLM's rank: ties do not push the token down
        top_lp, top_ids = logprobs.topk(num, dim=-1) if num > 0 else (tok_lp[:, :0], tgt[:, :0])
        for t, lp, rank, ids, lps in zip(tgt[:, 0].tolist(), tok_lp[:, 0].tolist(), ranks, top_ids.tolist(),
                                         top_lp.tolist()):
            out.append([(t, lp, rank), *((tid, tlp, k + 1) for k, (tid, tlp) in enumerate(zip(ids, lps)))])
    return out
