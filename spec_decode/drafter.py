"""Drafters that run a model in the worker (a draft model, EAGLE / EAGLE-3 heads): vLLM v1's shape.

After the target has sampled a step, the model runner waits for the step's tokens and hands the drafter a
`DraftBatch`; the drafter returns the next step's k draft tokens per sampling request (on the device), which travel
back in ModelRunnerOutput and are verified in the next step.

The drafter keeps its own KV cache beside the target's: the same block ids and slots (the scheduler allocates
`num_speculative_tokens` lookahead slots past each request's scheduled tokens for the drafts) in its own attention
context. A proposal is one "catch-up" forward followed by k - 1 one-token decode forwards:

- catch-up: per scheduled request, the positions the target computed this step that are now final (the accepted
  drafts, a prompt chunk) and, for a model that reads tokens only (the draft model), the token just sampled. Their
  draft KV is (re)written, so it always matches the committed tokens; the logits of each sampling request's last
  row give its first draft. Rejected positions are overwritten later, as in the target's cache.
- decode: the previous draft at the next position (EAGLE: with the head's own hidden state), one token per request:
  a uniform step, replayed from the drafter's CUDA graphs on the GPU.

On the GPU a uniform catch-up (every request the same number of rows, as in steady decoding at small batches) also
replays a captured graph (batch sizes up to 8, 1 .. k + 2 rows per request).

Subclasses say what a catch-up row reads (`token_shift`: 0 for a draft model; 1 for EAGLE, whose row at position p
combines the target's hidden state at p with token p + 1) and run the forward.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vllm_lite.attention import AttentionContext, StepMetadata
from vllm_lite.attention.selector import make_backend
from vllm_lite.compile.compiler import compile_model
from vllm_lite.compile.cuda_graphs import CUDAGraphRunner, default_capture_sizes
from vllm_lite.config import EngineConfig
from vllm_lite.sample.topk_topp import random_sample

logger = logging.getLogger("vllm_lite.spec_decode")

# (max_tokens, max_reqs) -> an input stager (the worker's InputStager: numpy inputs, one copy to the device).
StagerFactory = Callable[[int, int], Any]


@dataclass
class DraftBatch:
    """One sampled step with its tokens on the host. Per scheduled request (in the step's order): its token buffer
    (every known token, including those this step produced), KV block ids, the first position and the number of
    tokens the target computed this step, and the number of known tokens now. `sample_rows`: the requests that
    sampled this step (they get drafts), with their temperatures (0: greedy) and generators."""
    token_buffers: list[np.ndarray]
    block_ids: list[np.ndarray]
    starts: np.ndarray
    query_lens: np.ndarray
    num_tokens: np.ndarray
    sample_rows: np.ndarray
    temperatures: list[float]
    generators: list[torch.Generator | None]
    hidden: torch.Tensor | None = None  # the target's final hidden states of the step [T, H] (EAGLE)
    aux_hidden: list[torch.Tensor] = field(default_factory=list)  # the target's aux layer inputs (EAGLE-3)


@dataclass
class Drafts:
    token_ids: torch.Tensor  # [S, k] int64 on the device; row j belongs to batch.sample_rows[j]
    probs: torch.Tensor | None  # [S, k, V] float32 draft distributions when a row sampled (None: all greedy)


class ModelDrafter:
    """Shared machinery: attention context and KV cache, input staging, the (compiled) forward and decode graphs.

    Subclasses build `self.model` in `load(target_model)` and implement `_logits` (and, for heads that read the
    target's hidden states, `_set_catch_up_hidden` / `_set_decode_hidden`); the forward returns the hidden states for
    the logits, or (those, [the hidden state the next draft step reads])."""

    token_shift = 0  # a catch-up row at position p reads token p + token_shift
    needs_hidden = False  # the runner keeps each step's target hidden states for `propose`
    aux_hidden_layers: tuple[int, ...] = ()  # target layers whose inputs the drafter reads (EAGLE-3)

    def __init__(self, config: EngineConfig, target_info: Any, device: torch.device, max_blocks_per_seq: int,
                 make_stager: StagerFactory) -> None:
        self.config = config
        self.target_info = target_info
        self.device = device
        self.k = config.speculative.num_speculative_tokens
        self.block_size = config.cache.block_size
        self.max_blocks_per_seq = max_blocks_per_seq
        self.dtype = target_info.dtype
        self.vocab_size = int(target_info.hf_config.vocab_size)
        self.max_model_len = target_info.max_model_len
        sched = config.scheduler
        self.max_num_seqs = sched.max_num_seqs
        # A catch-up computes at most the target's tokens plus one per request.
        self.stagers = [make_stager(sched.max_num_batched_tokens + sched.max_num_seqs * (2 + self.k),
                                    sched.max_num_seqs)]
        self.stagers += [make_stager(sched.max_num_seqs, sched.max_num_seqs) for _ in range(self.k - 1)]
        self.model: torch.nn.Module | None = None
        self.ctx: AttentionContext | None = None
        self.num_layers = self.num_kv_heads = self.head_dim = 0
        self.graphs: CUDAGraphRunner | None = None  # one-token decode steps
        self.catch_up_graphs: CUDAGraphRunner | None = None  # uniform catch-ups of small batches
        self._consumed: torch.cuda.Event | None = None
        self.draft_seconds = 0.0  # host time spent in propose (benchmarks read it)
        self.num_proposals = 0

    # ---- set-up ------------------------------------------------------------------------------------------------
    def load(self, target_model: torch.nn.Module) -> None:
        raise NotImplementedError

    def _make_context(self, hf_config: Any) -> AttentionContext:
        """The drafter's own attention context (backend chosen as the target's), sized from its config."""
        self.num_layers = hf_config.num_hidden_layers
        num_heads = hf_config.num_attention_heads
        self.num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
        self.head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
        backend = make_backend(self.config.device.attention_backend, num_heads=num_heads,
                               num_kv_heads=self.num_kv_heads, head_dim=self.head_dim, scale=self.head_dim ** -0.5,
                               dtype=self.dtype, device=self.device, max_num_seqs=self.max_num_seqs,
                               max_blocks_per_seq=self.max_blocks_per_seq, kernels=self.config.kernels)
        self.ctx = AttentionContext(backend)
        return self.ctx

    def _finish_load(self, hidden_size: int) -> None:
        """torch.compile on CUDA (unless enforce_eager), as the target's forward."""
        self.hidden_size = hidden_size
        use_compile = self.device.type == "cuda" and not self.config.device.enforce_eager
        self.forward = compile_model(self.model, self.config) if use_compile else self.model.forward
        self.use_cuda_graphs = use_compile and self.ctx.backend.supports_cuda_graphs

    def kv_bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * elem * self.num_layers

    def initialize_kv_cache(self, num_blocks: int) -> None:
        """The drafter's KV cache (same block count and ids as the target's), then its decode graphs."""
        shape = self.ctx.backend.kv_cache_shape(num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        self.ctx.kv_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                              for _ in range(self.num_layers)]
        if not self.use_cuda_graphs:
            return
        sizes = default_capture_sizes(self.max_num_seqs, self.config.device.max_cudagraph_capture_size)
        if self.k > 1:
            self.graphs = CUDAGraphRunner(self.forward, sizes, max(sizes), self.device, self.hidden_size,
                                          self.dtype)
            self.graphs.capture(self._prepare_capture)
        # Catch-up rows per request in steady decoding: accepted drafts + 1 (+ the sampled token for a draft
        # model); graph padding keeps each dummy request in one block.
        max_rows = min(self.k + 2 - self.token_shift, self.block_size)
        small = [s for s in sizes if s <= 8]
        graphs = CUDAGraphRunner(self.forward, small, max(small), self.device, self.hidden_size, self.dtype,
                                 query_lens=tuple(range(1, max_rows + 1)))
        try:
            graphs.capture(self._prepare_capture)
        except (RuntimeError, ValueError) as e:  # an optimisation: the catch-up then runs compiled, without a graph
            logger.warning("drafter catch-up CUDA graphs not captured (%s: %s); catch-ups run without graphs",
                           type(e).__name__, e)
            graphs.release()
            return
        self.catch_up_graphs = graphs

    def _prepare_capture(self, num_tokens: int, query_len: int, slot_mapping: torch.Tensor) -> None:
        """A dummy uniform batch of num_tokens // query_len requests in block 0, writing nowhere (slots -1)."""
        meta = StepMetadata.for_capture(num_tokens, query_len, slot_mapping, self.block_size)
        self.ctx.metadata = self.ctx.backend.prepare(meta, graph_batch_size=num_tokens)

    # ---- subclass hooks ----------------------------------------------------------------------------------------
    def _set_catch_up_hidden(self, batch: DraftBatch, lens: np.ndarray) -> None:
        """Heads: place the target's hidden states of the catch-up rows where the forward reads them."""

    def _set_decode_hidden(self, hidden: torch.Tensor | None) -> None:
        """Heads: place the previous draft step's own hidden states (one row per drafting request)."""

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, H] -> logits over the target's vocabulary [N, V]."""
        raise NotImplementedError

    def _argmax(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, H] -> the greedy draft token ids [N]."""
        return self._logits(hidden).argmax(dim=-1)

    @staticmethod
    def _split(out: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The forward's output -> (hidden states for the logits, the hidden state the next draft step reads)."""
        if isinstance(out, tuple):
            return out[0], out[1][0]
        return out, None

    # ---- one proposal ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def propose(self, batch: DraftBatch) -> Drafts:
        """k draft tokens for each of batch.sample_rows (catch-up forward, then k - 1 decode forwards)."""
        t0 = time.perf_counter()
        shift = self.token_shift
        starts = batch.starts
        # A sampling request's catch-up ends at its last known token (draft model) or the one before (EAGLE: that
        # row pairs the hidden state with the last token); a partial prefill covers what the target computed.
        ends = starts + batch.query_lens
        if len(batch.sample_rows):
            ends[batch.sample_rows] = batch.num_tokens[batch.sample_rows] - shift
        lens = ends - starts
        tokens = [buf[s + shift: e + shift] for buf, s, e in zip(batch.token_buffers, starts.tolist(), ends.tolist())]
        self._wait_inputs()
        inputs = self.stagers[0].stage(tokens, starts, lens, batch.block_ids, batch.sample_rows)
        meta = inputs.meta
        q, graphs = meta.max_query_len, self.catch_up_graphs
        use_graph = (graphs is not None and meta.num_tokens == meta.num_reqs * q
                     and graphs.can_run(meta.num_tokens, q))
        if use_graph:
            self.ctx.metadata = self.ctx.backend.prepare(meta, graph_batch_size=graphs.padded_size(meta.num_tokens,
                                                                                                   q))
        else:
            self.ctx.set_step(meta)
        self._mark_inputs()
        self._set_catch_up_hidden(batch, lens)
        if use_graph:
            out = graphs.run(inputs.input_ids, inputs.positions, meta.num_tokens, meta.slot_mapping, q)
        else:
            out = self.forward(inputs.input_ids, inputs.positions)
        hidden, next_hidden = self._split(out)
        rows = inputs.logits_indices
        if not len(batch.sample_rows):  # only partial prefills: their draft KV is written, nothing to draft
            return Drafts(torch.empty(0, self.k, dtype=torch.int64, device=self.device), None)
        ids, probs = self._pick(hidden[rows], batch)
        all_ids, all_probs = [ids], [probs]
        if self.k > 1:
            block_ids = [batch.block_ids[i] for i in batch.sample_rows.tolist()]
            # Positions of the decode inputs: the first draft sits right after the catch-up; never past the
            # context or the request's allocated slots (the scheduler trims such drafts anyway).
            limit = np.array([min(len(b) * self.block_size, self.max_model_len) - 1 for b in block_ids],
                             dtype=np.int64)
            pos0 = ends[batch.sample_rows]
            prev_hidden = None if next_hidden is None else next_hidden[rows]
            for i in range(1, self.k):
                ids, probs, prev_hidden = self._decode_step(i, ids, prev_hidden, np.minimum(pos0 + i - 1, limit),
                                                            block_ids, batch)
                all_ids.append(ids)
                all_probs.append(probs)
        token_ids = torch.stack(all_ids, dim=1)
        stacked = None if all_probs[0] is None else torch.stack(all_probs, dim=1)
        self.draft_seconds += time.perf_counter() - t0
        self.num_proposals += 1
        return Drafts(token_ids, stacked)

    def _decode_step(self, i: int, ids: torch.Tensor, prev_hidden: torch.Tensor | None, positions: np.ndarray,
                     block_ids: list[np.ndarray], batch: DraftBatch
                     ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        n = len(positions)
        self._wait_inputs()
        zeros = np.zeros(1, dtype=np.int64)
        inputs = self.stagers[i].stage([zeros] * n, positions, np.ones(n, dtype=np.int64), block_ids,
                                       np.arange(n))
        inputs.input_ids[:n].copy_(ids)
        meta = inputs.meta
        use_graph = self.graphs is not None and self.graphs.can_run(n)
        if use_graph:
            self.ctx.metadata = self.ctx.backend.prepare(meta, graph_batch_size=self.graphs.padded_size(n))
        else:
            self.ctx.set_step(meta)
        self._mark_inputs()
        self._set_decode_hidden(prev_hidden)
        if use_graph:
            out = self.graphs.run(inputs.input_ids, inputs.positions, n, meta.slot_mapping)
        else:
            out = self.forward(inputs.input_ids, inputs.positions)
        hidden, next_hidden = self._split(out)
        ids, probs = self._pick(hidden[:n], batch)
        return ids, probs, None if next_hidden is None else next_hidden[:n]

    def _wait_inputs(self) -> None:
        """Host staging and the attention plan's page-locked buffers are reused: wait until the device has read the
        previous forward's copies (it has started that forward) before refilling them."""
        if self._consumed is not None:
            self._consumed.synchronize()

    def _mark_inputs(self) -> None:
        if self.device.type == "cuda":
            self._consumed = torch.cuda.Event()
            self._consumed.record()

    def _pick(self, hidden: torch.Tensor, batch: DraftBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Greedy rows take the argmax; sampling rows draw from softmax(logits / temperature) (their generator when
        seeded) and return those probabilities for the rejection sampler."""
        temps = batch.temperatures
        if all(t == 0.0 for t in temps):
            return self._argmax(hidden), None
        logits = self._logits(hidden)
        greedy = logits.argmax(dim=-1)
        t = torch.tensor([t if t > 0 else 1.0 for t in temps], dtype=torch.float32, device=logits.device)
        probs = torch.softmax(logits.float() / t[:, None], dim=-1)
        gens = {j: g for j, g in enumerate(batch.generators) if g is not None}
        sampled = random_sample(probs.clone(), gens)
        is_greedy = torch.tensor([t == 0.0 for t in temps], device=logits.device)
        return torch.where(is_greedy, greedy, sampled), probs
