"""CUDA-graph capture and replay for pure-decode steps.

One graph per capture size (default 1, 2, 4, 8, then every 8 up to max_num_seqs, capped at 512); a decode batch of
n tokens replays the graph of the smallest captured size >= n (padded). Inputs (token ids, positions) live in static
buffers of the largest size; each graph writes its hidden states into its own static output (a view of which `run`
returns). Graphs are captured largest first and share one memory pool, so the pool is about the activation memory
of the largest size plus the per-size outputs.

This module knows no attention backend. Attention metadata must live in static buffers that the backend refills
each step: the model runner gives `capture` a callback `prepare_for_capture(meta, batch_size)` that points the
attention context at the backend's graph-safe metadata for `meta`, a dummy decode batch of that size whose KV slots
are this runner's static slot buffer (FlashInfer: `ctx.metadata = backend.prepare(meta, graph_batch_size=bs)`).
Before each `run` the runner prepares the real step the same way with `graph_batch_size=runner.padded_size(n)`
and passes the step's slot_mapping to `run`, which copies it into the static buffer (-1 for padding rows).

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
                 dtype: torch.dtype, index_dtype: torch.dtype = torch.int32) -> None:
        """max_tokens: the largest batch that may be padded into a graph (sizes above it are dropped).
        hidden_size / dtype describe the model output (kept for callers and checks). index_dtype must match the
        dtype of the ids/positions the model is otherwise called with (the compiled graph is traced for it)."""
        self.model_forward = model_forward
        self.sizes = sorted({int(s) for s in capture_sizes if 0 < int(s) <= max_tokens})
        if not self.sizes:
            raise ValueError(f"no capture size in {list(capture_sizes)} fits max_tokens={max_tokens}")
        self.device = torch.device(device)
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.max_size = self.sizes[-1]
        self.input_ids = torch.zeros(self.max_size, dtype=index_dtype, device=self.device)
        self.positions = torch.zeros(self.max_size, dtype=index_dtype, device=self.device)
        # KV slots of the captured steps: real slots first, -1 (= do not write) for padding rows. Capture with
        # metadata whose slot_mapping is a view of this buffer (dummy_decode_metadata does), so replays read it.
        self.slot_mapping = torch.full((self.max_size,), -1, dtype=torch.int64, device=self.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None
        self.graph_pool_bytes = 0  # device memory the graphs hold (free-memory drop across capture)
        self.capture_seconds = 0.0

    # ---- sizes -----------------------------------------------------------------------------------------------
    def padded_size(self, num_tokens: int) -> int:
        """Smallest captured size >= num_tokens (ValueError if none)."""
        i = bisect.bisect_left(self.sizes, num_tokens)
        if num_tokens <= 0 or i == len(self.sizes):
            raise ValueError(f"no CUDA graph for {num_tokens} tokens (captured sizes up to {self.max_size})")
        return self.sizes[i]

    def can_run(self, num_tokens: int) -> bool:
        """True when graphs are captured and a size fits; the caller also checks the step is pure decode."""
        return bool(self.graphs) and 0 < num_tokens <= self.max_size

    # ---- capture ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def capture(self, prepare_for_capture: Callable[[Any, int], None], block_size: int) -> None:
        """Warm up and capture every size, largest first, in one shared pool.

        prepare_for_capture(meta, bs) is called before the warm-up and the capture of size bs with
        meta = self.dummy_decode_metadata(bs, block_size) (bs dummy decodes whose slot_mapping is the static slot
        buffer); it must point the attention context at the backend's graph-safe decode metadata, e.g.
        `ctx.metadata = backend.prepare(meta, graph_batch_size=bs)`."""
        if self.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        torch.cuda.synchronize(self.device)
        gc.collect()
        torch.cuda.empty_cache()
        free_before = torch.cuda.mem_get_info(self.device)[0]
        start = time.perf_counter()
        self.pool = torch.cuda.graph_pool_handle()
        for bs in sorted(self.sizes, reverse=True):
            prepare_for_capture(self.dummy_decode_metadata(bs, block_size), bs)
            ids, pos = self.input_ids[:bs], self.positions[:bs]
            self.model_forward(ids, pos)  # warm-up: compiles/autotunes this shape, initialises lazy state
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.model_forward(ids, pos)
            if out.shape[0] != bs or (self.hidden_size and out.shape[-1] != self.hidden_size):
                raise RuntimeError(f"model_forward returned {tuple(out.shape)} for a batch of {bs}")
            self.graphs[bs] = graph
            self.outputs[bs] = out
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - start
        gc.collect()
        torch.cuda.empty_cache()  # returns warm-up blocks; the graph pool stays reserved while graphs live
        self.graph_pool_bytes = max(free_before - torch.cuda.mem_get_info(self.device)[0], 0)
        logger.info("captured %d CUDA graphs (sizes %d..%d) in %.2f s; graph memory %.1f MiB", len(self.graphs),
                    self.sizes[0], self.max_size, self.capture_seconds, self.graph_pool_bytes / 2**20)

    # ---- replay ----------------------------------------------------------------------------------------------
    def dummy_decode_metadata(self, batch_size: int, block_size: int):
        """StepMetadata of `batch_size` dummy decodes (block 0, seq_len 1) whose slot_mapping is a view of the static
        slot buffer (all -1: nothing is written): what prepare_for_capture hands the backend's graph prepare."""
        from vllm_lite.attention.backend import StepMetadata

        dev = self.device
        qsl = torch.arange(batch_size + 1, dtype=torch.int32)
        lens = torch.ones(batch_size, dtype=torch.int32)
        self.slot_mapping.fill_(-1)
        return StepMetadata(batch_size, batch_size, qsl.to(dev), lens.to(dev),
                            torch.zeros(batch_size, 1, dtype=torch.int32, device=dev), self.slot_mapping[:batch_size],
                            qsl, lens, 1, 1, block_size)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, num_tokens: int,
            slot_mapping: torch.Tensor | None = None) -> torch.Tensor:
        """Copy the step's inputs (and KV slots, padding rows set to -1) into the static buffers, replay the padded
        size's graph and return hidden[:num_tokens] — a view of a static output, valid until the next replay.
        The attention metadata must already be prepared for graph_batch_size = padded_size(num_tokens). Padded
        rows keep stale (valid) ids and positions; their outputs are garbage and are not returned.
        slot_mapping=None leaves the slot buffer alone (for backends that keep their own static slots)."""
        bs = self.padded_size(num_tokens)
        self.input_ids[:num_tokens].copy_(input_ids[:num_tokens], non_blocking=True)
        self.positions[:num_tokens].copy_(positions[:num_tokens], non_blocking=True)
        if slot_mapping is not None:
            self.slot_mapping[:num_tokens].copy_(slot_mapping[:num_tokens], non_blocking=True)
            if bs > num_tokens:
                self.slot_mapping[num_tokens:bs].fill_(-1)
        self.graphs[bs].replay()
        return self.outputs[bs][:num_tokens]

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
                         prepare_for_capture: Callable[[Any, int], None], block_size: int,
                         index_dtype: torch.dtype = torch.int32) -> int:
    """Bytes the decode graphs will hold, measured by capturing only the largest size (it dominates the shared
    pool) and releasing it. Call during memory profiling, before the KV cache is sized, with a temporary KV cache;
    then subtract the result (plus the small per-size outputs, included by `outputs_bytes`) from the KV budget."""
    probe = CUDAGraphRunner(model_forward, [max_size], max_size, device, hidden_size, dtype, index_dtype)
    probe.capture(prepare_for_capture, block_size)
    nbytes = probe.graph_pool_bytes
    probe.release()
    return nbytes


def outputs_bytes(capture_sizes: Sequence[int], hidden_size: int, dtype: torch.dtype) -> int:
    """Static output memory of all sizes but the largest (which `measure_graph_memory` already counts)."""
    elem = torch.empty((), dtype=dtype).element_size()
    sizes = sorted(capture_sizes)
    return sum(sizes[:-1]) * hidden_size * elem
