"""CUDA-graph capture and replay for uniform decode steps: every request computes the same number of tokens q,
1 (plain decode) or 1 + k (verifying k speculative tokens); and for short prefill steps of at most R requests of any
lengths (key prefill_key(R) = -R; PREFILL = -1, one request).

One graph per (q, capture size) (sizes: requests 1, 2, 4, 8, then every 8 up to max_num_seqs, capped at 512; a graph
of q runs size * q tokens); a uniform batch of n requests replays the graph of the smallest captured size >= n
(padded with dummy requests of q tokens). A prefill graph of P tokens and R request slots runs n <= R requests of
T < P tokens in all (a short prompt arriving at an idle engine: its time to first token; with R > 1 also a prompt
joining a few running decodes), padded with R - n one-token dummy requests and one dummy request holding the other
tokens; the backend plans them all (FlashInfer's graph-mode prefill plan takes any query lengths of a fixed batch
size and total). Inputs (token ids, positions) live in static
buffers of the largest size; each graph writes its hidden states into its own static output (a view of which `run`
returns). Graphs are captured largest first and share one memory pool, so the pool is about the activation memory
of the largest size plus the per-size outputs.

This module knows no attention backend. Attention metadata must live in static buffers that the backend refills
each step: the model runner gives `capture` a callback `prepare_for_capture(num_tokens, query_len, slot_mapping)`
that points the attention context at the backend's graph-safe metadata for a dummy batch of num_tokens // query_len
requests whose KV slots are `slot_mapping` (a view of this runner's static slot buffer, all -1: nothing written).
Before each `run` the runner prepares the real step the same way with the padded token count
`runner.padded_size(n, q)` and passes the step's slot_mapping to `run`, which copies it into the static buffer (-1
for padding rows).

Graphs bake in every device address they touch: the KV caches, the weights, the backend's static buffers. Capture
therefore happens AFTER the KV cache is allocated and nothing may reallocate those tensors afterwards. To account
for graph memory before sizing the KV cache, measure it during profiling with a throw-away runner (see
`measure_graph_memory`) and subtract `graph_pool_bytes` from the KV budget.
"""
from __future__ import annotations

import bisect
import gc
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

logger = logging.getLogger("vllm_lite.compile")

DEFAULT_MAX_CAPTURE_SIZE = 512
PREFILL = -1  # the key of one-request prefill graphs (prefill_key(1))


def prefill_key(num_slots: int) -> int:
    """The graph key of prefill graphs with num_slots request slots (negative: never a query length)."""
    return -num_slots


def prefill_capture_sizes(max_tokens: int) -> list[int]:
    """Token counts of the prefill graphs: 16, 32, 64, 96, 128, 192, 256, 384, 512, ... up to max_tokens
    (a prompt pads by at most half its length)."""
    sizes = [16, 32, 64]
    while sizes[-1] < max_tokens:
        sizes.append(sizes[-1] * 3 // 2 if sizes[-1] & (sizes[-1] - 1) == 0 else sizes[-1] * 4 // 3)
    return [s for s in sizes if s <= max_tokens]


def prefill_slot_counts(max_requests: int) -> list[int]:
    """Request-slot counts of the prefill graphs: 1, 2, 4, 8, ... up to max_requests (rounded up to a power of 2)."""
    counts = [1]
    while counts[-1] < max_requests:
        counts.append(counts[-1] * 2)
    return counts


def graph_token_sizes(capture_sizes: Sequence[int], query_lens: Sequence[int] = (1,),
                      prefill_sizes: Sequence[int] = (), prefill_slots: Sequence[int] = (1,)) -> dict[int, list[int]]:
    """Token counts of every graph to capture, by key: a query length q -> each capture size x q; prefill_key(R) ->
    the prefill sizes above R (R one-token requests and the padding request must fit), if any."""
    sizes = sorted({int(s) for s in capture_sizes})
    token_sizes = {int(q): [s * int(q) for s in sizes] for q in sorted(set(query_lens))}
    for r in sorted(set(prefill_slots)) if prefill_sizes else ():
        fitting = sorted({int(s) for s in prefill_sizes if int(s) > r})
        if fitting:
            token_sizes[prefill_key(r)] = fitting
    return token_sizes


def default_capture_sizes(max_num_seqs: int, max_capture_size: int = DEFAULT_MAX_CAPTURE_SIZE) -> list[int]:
    """[1, 2, 4, 8] + range(16, ..., 8), covering every batch size up to min(max_num_seqs, max_capture_size): the
    sizes below that limit plus the first size at or above it (a batch of 5 with max_num_seqs=5 pads to 8)."""
    limit = max(1, min(max_num_seqs, max_capture_size))
    candidates = [1, 2, 4, 8] + list(range(16, max(limit, 16) + 8, 8))
    sizes = [s for s in candidates if s < limit]
    sizes.append(next(s for s in candidates if s >= limit))
    return sizes


class CUDAGraphRunner:
    """Captured decode graphs of `model_forward(input_ids[bs], positions[bs]) -> hidden [bs, hidden_size]`."""

    def __init__(self, model_forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 capture_sizes: Sequence[int], max_tokens: int, device: torch.device | str, hidden_size: int,
                 dtype: torch.dtype, index_dtype: torch.dtype = torch.int32,
                 query_lens: Sequence[int] = (1,), prefill_sizes: Sequence[int] = (),
                 prefill_slots: Sequence[int] = (1,)) -> None:
        """capture_sizes: batch sizes in requests; max_tokens: the largest batch of requests that may be padded into
        a graph (sizes above it are dropped); query_lens: the uniform tokens per request to capture (1, 1 + k);
        prefill_sizes: token counts of prefill graphs, none by default, captured for each request-slot count in
        prefill_slots (key prefill_key(R); sizes of at most R tokens are dropped).
        hidden_size / dtype describe the model output (kept for callers and checks). index_dtype must match the
        dtype of the ids/positions the model is otherwise called with (the compiled graph is traced for it)."""
        self.model_forward = model_forward
        self.sizes = sorted({int(s) for s in capture_sizes if 0 < int(s) <= max_tokens})
        if not self.sizes:
            raise ValueError(f"no capture size in {list(capture_sizes)} fits max_tokens={max_tokens}")
        self.token_sizes = graph_token_sizes(self.sizes, query_lens, prefill_sizes, prefill_slots)
        self._prefill_keys = sorted((k for k in self.token_sizes if k < 0), reverse=True)  # -1, -2, -4, ...
        self.device = torch.device(device)
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.max_size = max(sizes[-1] for sizes in self.token_sizes.values())
        self.input_ids = torch.zeros(self.max_size, dtype=index_dtype, device=self.device)
        self.positions = torch.zeros(self.max_size, dtype=index_dtype, device=self.device)
        # KV slots of the captured steps: real slots first, -1 (= do not write) for padding rows. Capture with
        # metadata whose slot_mapping is a view of this buffer (dummy_decode_metadata does), so replays read it.
        self.slot_mapping = torch.full((self.max_size,), -1, dtype=torch.int64, device=self.device)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # (query_len, tokens) -> graph
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}
        self.num_replays = {q: 0 for q in self.token_sizes}  # per tokens-per-request (tests and benchmarks read it)
        self.pool = None
        self.graph_pool_bytes = 0  # device memory the graphs hold (free-memory drop across capture)
        self.capture_seconds = 0.0

    # ---- sizes -----------------------------------------------------------------------------------------------
    def padded_size(self, num_tokens: int, query_len: int = 1) -> int:
        """Smallest captured token count >= num_tokens for this query length (ValueError if none); for a prefill key
        the smallest > num_tokens (the last dummy request needs a token)."""
        sizes = self.token_sizes.get(query_len, ())
        i = (bisect.bisect_right if query_len < 0 else bisect.bisect_left)(sizes, num_tokens)
        if num_tokens <= 0 or i == len(sizes):
            raise ValueError(f"no CUDA graph for {num_tokens} tokens of {query_len} per request")
        return sizes[i]

    def can_run(self, num_tokens: int, query_len: int = 1) -> bool:
        """True when graphs are captured and a size fits; the caller also checks every request has query_len
        tokens."""
        sizes = self.token_sizes.get(query_len)
        limit = sizes[-1] - 1 if query_len < 0 and sizes else (sizes or [0])[-1]
        return bool(self.graphs) and sizes is not None and 0 < num_tokens <= limit

    def graph_for(self, num_reqs: int, num_tokens: int, max_query_len: int) -> tuple[int, int] | None:
        """(graph key, padded token count) of the graph a step replays, or None when it runs outside graphs: a
        uniform step of a captured query length, else the prefill graph of the fewest request slots R >= num_reqs
        whose size fits the step's tokens plus its R - num_reqs one-token dummies."""
        if num_tokens == num_reqs * max_query_len and max_query_len in self.token_sizes \
                and self.can_run(num_tokens, max_query_len):
            return max_query_len, self.padded_size(num_tokens, max_query_len)
        for key in self._prefill_keys:
            need = num_tokens + (-key - num_reqs)
            if -key >= num_reqs and self.can_run(need, key):
                return key, self.padded_size(need, key)
        return None

    # ---- capture ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def capture(self, prepare_for_capture: Callable[[int, int, torch.Tensor], None]) -> None:
        """Warm up and capture every (query length, size), largest first, in one shared pool.

        prepare_for_capture(num_tokens, query_len, slot_mapping) is called before the warm-up and the capture of
        each graph; slot_mapping is a view of the static slot buffer (all -1). It must point the attention context
        at the backend's graph-safe metadata for num_tokens // query_len dummy requests of query_len tokens."""
        if self.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        torch.cuda.synchronize(self.device)
        gc.collect()
        torch.cuda.empty_cache()
        free_before = torch.cuda.mem_get_info(self.device)[0]
        start = time.perf_counter()
        self.pool = torch.cuda.graph_pool_handle()
        order = sorted(((n, q) for q, sizes in self.token_sizes.items() for n in sizes), reverse=True)
        logger.info("capturing %d CUDA graphs (tokens per request %s; prefill graphs of %s request slots)",
                    len(order), [q for q in self.token_sizes if q > 0], [-q for q in self._prefill_keys] or "no")
        for done, (bs, q) in enumerate(order):
            if done and done % 16 == 0:
                logger.info("  %d / %d CUDA graphs captured (%.1f s)", done, len(order), time.perf_counter() - start)
            self.slot_mapping.fill_(-1)
            prepare_for_capture(bs, q, self.slot_mapping[:bs])
            ids, pos = self.input_ids[:bs], self.positions[:bs]
            self.model_forward(ids, pos)  # warm-up: compiles/autotunes this shape, initialises lazy state
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.model_forward(ids, pos)
            hidden = out[0] if isinstance(out, tuple) else out
            if hidden.shape[0] != bs or (self.hidden_size and hidden.shape[-1] != self.hidden_size):
                raise RuntimeError(f"model_forward returned {tuple(hidden.shape)} for a batch of {bs}")
            self.graphs[q, bs] = graph
            self.outputs[q, bs] = out
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - start
        gc.collect()
        torch.cuda.empty_cache()  # returns warm-up blocks; the graph pool stays reserved while graphs live
        self.graph_pool_bytes = max(free_before - torch.cuda.mem_get_info(self.device)[0], 0)
        logger.info("captured %d CUDA graphs (batch sizes %d..%d, tokens per request %s) in %.2f s; graph memory "
                    "%.1f MiB", len(self.graphs), self.sizes[0], self.sizes[-1], list(self.token_sizes),
                    self.capture_seconds, self.graph_pool_bytes / 2**20)

    # ---- replay ----------------------------------------------------------------------------------------------
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, num_tokens: int,
            slot_mapping: torch.Tensor | None = None, query_len: int = 1, padded_tokens: int | None = None) -> Any:
        """Copy the step's inputs (and KV slots, padding rows set to -1) into the static buffers, replay the padded
        size's graph and return hidden[:num_tokens] — a view of a static output, valid until the next replay.
        The attention metadata must already be prepared for graph_batch_size = padded_size(num_tokens, q). Padded
        rows keep stale (valid) ids and positions; their outputs are garbage and are not returned.
        slot_mapping=None leaves the slot buffer alone (for backends that keep their own static slots).
        padded_tokens: the graph's size when graph_for chose it (a prefill graph's also counts its dummy requests)."""
        bs = padded_tokens or self.padded_size(num_tokens, query_len)
        self.input_ids[:num_tokens].copy_(input_ids[:num_tokens], non_blocking=True)
        self.positions[:num_tokens].copy_(positions[:num_tokens], non_blocking=True)
        if slot_mapping is not None:
            self.slot_mapping[:num_tokens].copy_(slot_mapping[:num_tokens], non_blocking=True)
            if bs > num_tokens:
                self.slot_mapping[num_tokens:bs].fill_(-1)
        self.graphs[query_len, bs].replay()
        self.num_replays[query_len] += 1
        out = self.outputs[query_len, bs]
        if isinstance(out, tuple):  # (hidden, aux hidden states): the model returns intermediate layers too
            return out[0][:num_tokens], [a[:num_tokens] for a in out[1]]
        return out[:num_tokens]

    def release(self) -> None:
        """Drop the graphs, their outputs and the pool."""
        self.graphs.clear()
        self.outputs.clear()
        self.pool = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def measure_graph_memory(model_forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], max_size: int,
                         device: torch.device | str, hidden_size: int, dtype: torch.dtype,
                         prepare_for_capture: Callable[[int, int, torch.Tensor], None],
                         index_dtype: torch.dtype = torch.int32, query_len: int = 1, prefill_size: int = 0) -> int:
    """Bytes the decode graphs will hold, measured by capturing only the largest size (max_size requests of the
    largest query length) and the largest prefill graph (prefill_size tokens, if any): they dominate the shared pool.
    Call during memory profiling, before the KV cache is sized, with a temporary KV cache;
    then subtract the result (plus the small per-size outputs, included by `outputs_bytes`) from the KV budget."""
    probe = CUDAGraphRunner(model_forward, [max_size], max_size, device, hidden_size, dtype, index_dtype,
                            (query_len,), [prefill_size] if prefill_size else ())
    probe.capture(prepare_for_capture)
    nbytes = probe.graph_pool_bytes
    probe.release()
    return nbytes


def outputs_bytes(token_sizes: dict[int, list[int]], hidden_size: int, dtype: torch.dtype) -> int:
    """Static output memory of all graphs (`graph_token_sizes`) but the largest (which `measure_graph_memory` already
    counts)."""
    elem = torch.empty((), dtype=dtype).element_size()
    tokens = sorted(n for sizes in token_sizes.values() for n in sizes)
    return sum(tokens[:-1]) * hidden_size * elem
