"""The model runner's side of an in-worker drafter (speculative `method` draft_model / eagle / eagle3).

After a step is sampled the runner calls `propose` (its tokens must be on the host: the request states hold them);
the drafts go out with that step's ModelRunnerOutput (`attach`), and the draft distributions of sampled drafts stay
here, on the request states, for the next step's rejection sampler (`draft_probs`).
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from vllm_lite.config import EngineConfig
from vllm_lite.protocol import ModelRunnerOutput
from vllm_lite.spec_decode.drafter import DraftBatch, ModelDrafter
from vllm_lite.worker.input_batch import InputStager
from vllm_lite.worker.request_state import CachedRequestState


def make_drafter(config: EngineConfig, info: Any, device: torch.device,
                 max_blocks_per_seq: int) -> ModelDrafter | None:
    """The drafter `config.speculative.method` asks for (None for engine-core proposers and no speculation)."""
    method = config.speculative.method
    if method not in ("draft_model", "eagle", "eagle3"):
        return None
    block_size = config.cache.block_size

    def make_stager(max_tokens: int, max_reqs: int) -> InputStager:
        return InputStager(max_tokens, max_reqs, max_blocks_per_seq, block_size, device)

    if method == "draft_model":
        from vllm_lite.spec_decode.draft_model import DraftModelDrafter
        return DraftModelDrafter(config, info, device, max_blocks_per_seq, make_stager)
    from vllm_lite.spec_decode.eagle import EagleDrafter
    return EagleDrafter(config, info, device, max_blocks_per_seq, make_stager)


class WorkerDrafting:
    """Runs the drafter after each sampled step and keeps its drafts until the step's output is returned."""

    def __init__(self, drafter: ModelDrafter) -> None:
        self.drafter = drafter
        self._drafts: dict[int, tuple[list[str], torch.Tensor, Any]] = {}  # launch -> (req ids, host ids, event)

    def propose(self, launch_number: int, states: list[CachedRequestState], starts: np.ndarray,
                query_lens: np.ndarray, sample_rows: list[int], hidden: torch.Tensor | None,
                aux_hidden: list[torch.Tensor]) -> None:
        """states: every request of the step (tokens resolved); sample_rows: indices of those that sampled. Above
        speculative disable_by_batch_size requests only the drafter's KV cache follows (no drafts: the engine
        core's policy would not verify them)."""
        limit = self.drafter.config.speculative.disable_by_batch_size
        if limit is not None and len(states) > limit:
            sample_rows = []
        rows = np.asarray(sample_rows, dtype=np.int64)
        sampling = [states[i] for i in sample_rows]
        params = [s.sampling_params for s in sampling]
        batch = DraftBatch(
            token_buffers=[s.token_buffer for s in states], block_ids=[s.block_ids for s in states],
            starts=starts, query_lens=query_lens,
            num_tokens=np.fromiter((s.num_tokens for s in states), dtype=np.int64, count=len(states)),
            sample_rows=rows, temperatures=[0.0 if p.greedy else float(p.temperature) for p in params],
            generators=[s.generator for s in sampling], hidden=hidden, aux_hidden=aux_hidden)
        drafts = self.drafter.propose(batch)
        for j, state in enumerate(sampling):
            state.draft_probs = None if drafts.probs is None else drafts.probs[j]
        if sampling:
            self._keep(launch_number, [s.req_id for s in sampling], drafts.token_ids)

    def propose_padded(self, launch_number: int, states: list[CachedRequestState], starts: np.ndarray,
                       query_lens: np.ndarray, num_drafts: list[int] | None, sampled: torch.Tensor,
                       hidden: torch.Tensor | None, aux_hidden: list[torch.Tensor]) -> bool:
        """A uniform verification step's proposal on the device (greedy and unseeded sampling requests), launched
        without waiting for its tokens (spec_decode/padded_proposal.py); False where the step does not qualify (the
        caller takes `propose`).
        states: the step's requests, all of which sampled; sampled: the rejection sampler's tokens [R, k + 1] (every
        request verified k drafts), or a plain decode step's [R] (one token each, no drafts)."""
        drafter = self.drafter
        padded = getattr(drafter, "padded", None)
        limit = drafter.config.speculative.disable_by_batch_size
        n = len(states)
        uniform = (all(k == drafter.k for k in num_drafts) if num_drafts is not None
                   else sampled.dim() == 1 and bool((query_lens == 1).all()))
        seeded = any(s.generator is not None and not s.sampling_params.greedy for s in states)
        if padded is None or not uniform or seeded or n > padded.max_batch or (limit is not None and n > limit):
            return False  # (a seeded request's own generator cannot be replayed by a graph)
        t0 = time.perf_counter()
        sources = list(aux_hidden) if drafter.eagle3 else [hidden]
        temps = [0.0 if s.sampling_params.greedy else float(s.sampling_params.temperature) for s in states]
        ids, probs = padded.propose(sampled.view(n, -1), sources, starts, [s.block_ids for s in states],
                                    drafter.max_model_len, temps)
        if probs is not None:  # the next step's rejection sampler reads them after the next proposal replays
            probs = probs.clone()
        for j, state in enumerate(states):
            state.draft_probs = probs[j] if probs is not None and temps[j] > 0 else None
        self._keep(launch_number, [s.req_id for s in states], ids)
        drafter.draft_seconds += time.perf_counter() - t0
        drafter.num_proposals += 1
        return True

    def _keep(self, launch_number: int, req_ids: list[str], ids: torch.Tensor) -> None:
        pin = ids.device.type == "cuda"
        host = ids.to("cpu", non_blocking=pin)
        event = None
        if pin:
            event = torch.cuda.Event()
            event.record()
        self._drafts[launch_number] = (req_ids, host, event)

    def attach(self, launch_number: int, output: ModelRunnerOutput) -> None:
        """Put the drafts proposed after this launch into its output (per output request; [] for none)."""
        entry = self._drafts.pop(launch_number, None)
        if entry is None:
            return
        req_ids, host, event = entry
        if event is not None:
            event.synchronize()
        by_id = dict(zip(req_ids, host.tolist()))
        output.draft_token_ids = [by_id.get(r, []) for r in output.req_ids]

    @staticmethod
    def draft_probs(states: list[CachedRequestState], num_drafts: list[int], draft_ids: torch.Tensor,
                    vocab_size: int) -> torch.Tensor | None:
        """[S, K, V] draft distributions of a verification step's requests, draft_ids [S, K] (-1 padded); None
        when every draft was greedy. A request without sampled drafts gets point masses on its drafts (what the
        rejection sampler assumes without probabilities)."""
        if not any(s.draft_probs is not None and k for s, k in zip(states, num_drafts)):
            return None
        q = torch.zeros(*draft_ids.shape, vocab_size, dtype=torch.float32, device=draft_ids.device)
        q.scatter_(2, draft_ids.clamp(min=0).unsqueeze(2), 1.0)
        for j, (s, k) in enumerate(zip(states, num_drafts)):
            if s.draft_probs is not None and k:
                q[j, :k] = s.draft_probs[:k]
        return q
