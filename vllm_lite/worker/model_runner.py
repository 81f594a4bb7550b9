"""Runs one step on the device: keeps per-request state, builds flat inputs, runs the model and samples.

Inputs are built from numpy arrays with per-request (never per-token) Python work and copied to the device once.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vllm_lite.attention import AttentionContext, StepMetadata
from vllm_lite.compile.compiler import compile_model
from vllm_lite.compile.cuda_graphs import (CUDAGraphRunner, default_capture_sizes, measure_graph_memory,
                                          outputs_bytes)
from vllm_lite.attention.selector import make_backend
from vllm_lite.config import DEFAULT_CPU_KV_CACHE_BYTES, EngineConfig
from vllm_lite.core.sched_output import ModelRunnerOutput, SchedulerOutput
from vllm_lite.model_loader import ModelInfo, load_model
from vllm_lite.sample.metadata import SamplingMetadata
from vllm_lite.sample.sampler import Sampler
from vllm_lite.sample.topk_topp import skip_random_draws
from vllm_lite.sampling_params import SamplingParams
from vllm_lite.worker.input_batch import InputStager
from vllm_lite.worker.request_state import CachedRequestState

logger = logging.getLogger("vllm_lite.model_runner")


@dataclass
class _Launch:
    """One launched step: which requests it ran, which rows sampled, and the sampled ids on their way to the host."""
    number: int
    req_ids: list[str]
    rows: list[int]  # indices into req_ids of the requests that sampled (row j of the sampled ids)
    host: list[Any] = field(default_factory=list)  # non-blocking host copies: ids [, logprob ids, values, ranks]
    done: Any = None  # CUDA event after the copies
    num_logprobs: list[int | None] = field(default_factory=list)  # per sampling row, when logprobs were computed
    positions: list[int] = field(default_factory=list)  # per sampling row: the token position it fills
    output: ModelRunnerOutput | None = None


class ModelRunner:
    def __init__(self, config: EngineConfig, info: ModelInfo, device: torch.device) -> None:
        self.config = config
        self.info = info
        self.device = device
        self.block_size = config.cache.block_size
        hf = info.hf_config
        self.vocab_size = hf.vocab_size
        self.num_layers = hf.num_hidden_layers
        self.num_heads = hf.num_attention_heads
        self.num_kv_heads = getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
        self.head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        sched = config.scheduler
        self.max_blocks_per_seq = -(-info.max_model_len // self.block_size)
        self.attn_ctx = AttentionContext(make_backend(
            config.device.attention_backend, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim, scale=self.head_dim ** -0.5, dtype=info.dtype, device=device,
            max_num_seqs=sched.max_num_seqs, max_blocks_per_seq=self.max_blocks_per_seq))
        logger.info("attention backend: %s", self.attn_ctx.backend.name)
        self.model: torch.nn.Module | None = None
        self.sampler = Sampler()
        self.requests: dict[str, CachedRequestState] = {}
        self._sampling_key: tuple[str, ...] | None = None
        self._sampling_cached: SamplingMetadata | None = None
        self.pending: deque[_Launch] = deque()  # launched steps whose output was not returned yet
        self._launches = 0
        self._last_sampled: torch.Tensor | None = None
        self._inputs_consumed: torch.cuda.Event | None = None
        self.num_blocks = 0
        self.stager = InputStager(max(sched.max_num_batched_tokens, sched.max_num_seqs), sched.max_num_seqs,
                                  self.max_blocks_per_seq, self.block_size, device)

    def load_model(self) -> None:
        start = time.perf_counter()
        torch.manual_seed(self.config.model.seed)
        self.model = load_model(self.info, self.config.load, self.device, self.attn_ctx)
        logger.info("model loaded in %.2f s", time.perf_counter() - start)
        # torch.compile and CUDA graphs are the CUDA fast path; CPU runs stay eager (compiling costs more there
        # than it saves for development and tests).
        self.use_compile = self.device.type == "cuda" and not self.config.device.enforce_eager
        self.forward = compile_model(self.model, self.config) if self.use_compile else self.model.forward
        self.use_cuda_graphs = self.use_compile and self.attn_ctx.backend.supports_cuda_graphs
        self.graphs: CUDAGraphRunner | None = None
        self.capture_sizes = default_capture_sizes(self.config.scheduler.max_num_seqs,
                                                   self.config.device.max_cudagraph_capture_size)

    # ---- KV cache sizing -------------------------------------------------------------------------------------
    def kv_bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.info.dtype).element_size()
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * elem * self.num_layers

    def determine_num_blocks(self) -> int:
        """Blocks that fit: override, else free GPU memory after profiling, else the CPU byte budget."""
        cache = self.config.cache
        sched = self.config.scheduler
        max_useful = sched.max_num_seqs * -(-self.info.max_model_len // self.block_size) + 1
        if cache.num_gpu_blocks_override is not None:
            return cache.num_gpu_blocks_override
        per_block = self.kv_bytes_per_block()
        if self.device.type == "cuda":
            budget = self._profile_free_cuda_bytes()
        else:
            budget = cache.kv_cache_memory_bytes or DEFAULT_CPU_KV_CACHE_BYTES
        num_blocks = min(budget // per_block, max_useful)
        if num_blocks < 2:
            raise ValueError(f"not enough memory for the KV cache: {budget} bytes, {per_block} bytes per block")
        return int(num_blocks)

    def _profile_free_cuda_bytes(self) -> int:
        """Peak memory of a forward over max_num_batched_tokens tokens, then what the utilisation target leaves."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        n = min(self.config.scheduler.max_num_batched_tokens, self.info.max_model_len)
        nblk = -(-n // self.block_size)
        saved = self.attn_ctx.kv_caches
        self._allocate_kv(nblk)
        inputs = self.stager.stage([np.zeros(n, dtype=np.int32)], np.zeros(1, dtype=np.int64),
                                   np.array([n]), [list(range(nblk))], np.zeros(1, dtype=np.int64))
        self.attn_ctx.set_step(inputs.meta)
        with torch.inference_mode():
            hidden = self.forward(inputs.input_ids, inputs.positions)
            self.model.compute_logits(hidden[-self.config.scheduler.max_num_seqs:]).float()  # + the sampler's copy
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        graph_bytes = 0
        if self.use_cuda_graphs:
            graph_bytes = measure_graph_memory(self.forward, max(self.capture_sizes), self.device,
                                               self.info.hf_config.hidden_size, self.info.dtype,
                                               self._prepare_graph_step, self.block_size)
            graph_bytes += outputs_bytes(self.capture_sizes, self.info.hf_config.hidden_size, self.info.dtype)
        self.attn_ctx.kv_caches = saved
        torch.cuda.empty_cache()
        _, total = torch.cuda.mem_get_info(self.device)
        budget = int(total * self.config.cache.gpu_memory_utilization) - peak - graph_bytes
        logger.info("profiling: peak %.2f GiB of %.2f GiB, CUDA graphs %.2f GiB; %.2f GiB for the KV cache",
                    peak / 2**30, total / 2**30, graph_bytes / 2**30, budget / 2**30)
        return max(budget, 0)

    def _allocate_kv(self, num_blocks: int) -> None:
        shape = self.attn_ctx.backend.kv_cache_shape(num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        self.attn_ctx.kv_caches = [torch.zeros(shape, dtype=self.info.dtype, device=self.device)
                                   for _ in range(self.num_layers)]

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._allocate_kv(num_blocks)
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB)", num_blocks, self.block_size,
                    num_blocks * self.kv_bytes_per_block() / 2**20)
        if self.use_cuda_graphs:  # after the KV cache exists: graphs bake in its address
            self.graphs = CUDAGraphRunner(self.forward, self.capture_sizes, max(self.capture_sizes), self.device,
                                          self.info.hf_config.hidden_size, self.info.dtype)
            self.graphs.capture(self._prepare_graph_step, self.block_size)

    def _prepare_graph_step(self, meta: StepMetadata, batch_size: int) -> None:
        self.attn_ctx.metadata = self.attn_ctx.backend.prepare(meta, graph_batch_size=batch_size)

    # ---- one step --------------------------------------------------------------------------------------------
    def _update_states(self, so: SchedulerOutput) -> None:
        for req_id in so.finished_req_ids:
            self.requests.pop(req_id, None)
        for data in so.scheduled_new_reqs:
            state = CachedRequestState(data, self.device)
            if state.generator is not None and state.num_output_tokens and not data.sampling_params.greedy:
                skip_random_draws(state.generator, state.num_output_tokens, self.vocab_size, self.device)
            self.requests[data.req_id] = state
        for data in so.scheduled_cached_reqs:
            state = self.requests[data.req_id]
            if data.new_block_ids:
                state.add_blocks(data.new_block_ids)
            state.num_computed_tokens = data.num_computed_tokens

    @torch.inference_mode()
    def execute_model(self, so: SchedulerOutput) -> None:
        """Launch one step (inputs, forward, sampling, async copy of the sampled ids); `get_output` returns it."""
        if self._inputs_consumed is not None:
            # The host staging buffer and FlashInfer's page-locked plan buffer are reused: wait until the device
            # has read the previous step's copies (it has started that step; this costs nothing in practice).
            self._inputs_consumed.synchronize()
        self._update_states(so)
        self._launches += 1
        req_ids = list(so.num_scheduled_tokens)
        if not req_ids:
            self.pending.append(_Launch(self._launches, [], [], output=ModelRunnerOutput([], [], [])))
            return
        states = [self.requests[r] for r in req_ids]
        if any(s.pending and _uses_token_values(s.sampling_params) for s in states):
            self._resolve_all()  # penalties need the values of the tokens still on the device
        query_lens = np.fromiter(so.num_scheduled_tokens.values(), dtype=np.int64, count=len(req_ids))
        starts = np.fromiter((s.num_computed_tokens for s in states), dtype=np.int64, count=len(states))
        ends = starts + query_lens
        # Only requests whose scheduled tokens reach the end of what is known sample; partial prefills do not.
        known = np.fromiter((s.num_tokens for s in states), dtype=np.int64, count=len(states))
        sample_rows = np.flatnonzero(ends >= known)
        fill_dst, fill_src = self._device_token_fills(states, starts, ends, query_lens)
        # Steady decode: token i is row i of the previous launch's ids, one copy instead of a gather + scatter.
        # (dst is increasing, so dst[0] == 0 and dst[-1] == len - 1 make it 0..k-1.)
        in_order = fill_dst is not None and fill_dst[0] == 0 and fill_dst[-1] == len(fill_dst) - 1 \
            and bool(np.array_equal(fill_dst, fill_src))
        inputs = self.stager.stage([s.token_ids[st:e] for s, st, e in zip(states, starts.tolist(), ends.tolist())],
                                   starts, query_lens, [s.block_ids for s in states], sample_rows,
                                   *((None, None) if in_order else (fill_dst, fill_src)))
        if in_order:
            inputs.input_ids[: len(fill_dst)].copy_(self._last_sampled[: len(fill_dst)])
        elif inputs.fill_dst is not None:
            inputs.input_ids[inputs.fill_dst] = self._last_sampled[inputs.fill_src].to(inputs.input_ids.dtype)
        meta = inputs.meta
        use_graph = self.graphs is not None and meta.is_pure_decode and self.graphs.can_run(meta.num_tokens)
        if use_graph:
            self._prepare_graph_step(meta, self.graphs.padded_size(meta.num_tokens))
        else:
            self.attn_ctx.set_step(meta)
        if self.device.type == "cuda":
            self._inputs_consumed = torch.cuda.Event()
            self._inputs_consumed.record()
        if use_graph:
            hidden = self.graphs.run(inputs.input_ids, inputs.positions, meta.num_tokens, meta.slot_mapping)
        else:
            hidden = self.forward(inputs.input_ids, inputs.positions)
        rows = sample_rows.tolist()
        launch = _Launch(self._launches, req_ids, rows)
        if rows:
            # Pure decode where every request samples: the rows are 0..n-1 already, no gather needed.
            all_rows = meta.is_pure_decode and len(rows) == meta.num_tokens
            logits = self.model.compute_logits(hidden[: meta.num_tokens] if all_rows else hidden[inputs.logits_indices])
            out = self.sampler(logits, self._sampling_metadata([states[i] for i in rows]), logits_owned=True)
            self._last_sampled = out.sampled_token_ids
            tensors = [out.sampled_token_ids]
            if out.logprobs is not None:
                tensors += [out.logprob_token_ids, out.logprobs, out.ranks]
                launch.num_logprobs = [states[i].sampling_params.logprobs for i in rows]
            launch.host = [t.to("cpu", non_blocking=True) for t in tensors]
            if self.device.type == "cuda":
                launch.done = torch.cuda.Event()
                launch.done.record()
            launch.positions = [states[i].add_placeholder(self._launches, j) for j, i in enumerate(rows)]
        self.pending.append(launch)

    def get_output(self) -> ModelRunnerOutput:
        """Results of the oldest launched step not yet returned (waits for its sampled ids)."""
        return self._resolve(self.pending.popleft())

    def _resolve_all(self) -> None:
        for launch in self.pending:
            self._resolve(launch)

    def _resolve(self, launch: "_Launch") -> ModelRunnerOutput:
        """Wait for a launch's sampled ids, write them into the request states, build its output (once)."""
        if launch.output is not None:
            return launch.output
        if launch.done is not None:
            launch.done.synchronize()
        tokens = launch.host[0].tolist() if launch.rows else []
        sampled: list[list[int]] = [[] for _ in launch.req_ids]
        logprobs: list = [None] * len(launch.req_ids)
        requests, number = self.requests, launch.number
        for j, (i, pos) in enumerate(zip(launch.rows, launch.positions)):
            sampled[i] = tokens[j: j + 1]
            state = requests.get(launch.req_ids[i])
            # Else finished or preempted meanwhile (the scheduler drops the token), or re-added since then.
            if state is not None and state.pending.get(pos) == (number, j):
                state.resolve(pos, tokens[j])
        if launch.num_logprobs:
            lp = _logprob_lists(*launch.host[1:])
            for j, (i, n) in enumerate(zip(launch.rows, launch.num_logprobs)):
                if n is not None:
                    logprobs[i] = [lp[j][: n + 1]]
        launch.output = ModelRunnerOutput(launch.req_ids, sampled, logprobs)
        launch.host = []
        return launch.output

    def _device_token_fills(self, states: list[CachedRequestState], starts: np.ndarray, ends: np.ndarray,
                            query_lens: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Flat indices of scheduled tokens that were sampled by the previous launch and are not on the host yet,
        with their rows in that launch's sampled ids (older pending tokens are resolved first)."""
        dst: list[int] = []
        src: list[int] = []
        offset = 0
        for s, st, e, n in zip(states, starts.tolist(), ends.tolist(), query_lens.tolist()):
            if s.pending:
                for pos, (launch, row) in list(s.pending.items()):
                    if st <= pos < e:
                        if launch != self._launches - 1:
                            self._resolve_all()  # an older launch: its values are on the host once resolved
                            continue
                        dst.append(offset + pos - st)
                        src.append(row)
            offset += n
        if not dst:
            return None, None
        return np.array(dst, dtype=np.int32), np.array(src, dtype=np.int32)

    def _sampling_metadata(self, states: list[CachedRequestState]) -> SamplingMetadata:
        """Rebuilt only when the batch changes, or when penalties / min_tokens make it depend on the outputs."""
        key = tuple(s.req_id for s in states)
        if key == self._sampling_key:  # same batch, and its metadata does not depend on the outputs
            return self._sampling_cached
        params = [s.sampling_params for s in states]
        penalised = any(_uses_token_values(p) for p in params)
        blocked = [self._blocked_ids(s) for s in states]
        meta = SamplingMetadata.build(
            params=params, prompt_token_ids=[s.prompt_token_ids if penalised else [] for s in states],
            output_token_ids=[s.output_token_ids if penalised else [] for s in states],
            generators=[s.generator for s in states], stop_ids_blocked=blocked, device=self.device,
            vocab_size=self.vocab_size)
        # Cacheable once no row is penalised or below min_tokens (outputs only grow while the batch is unchanged).
        self._sampling_key = None if penalised or any(blocked) else key
        self._sampling_cached = meta
        return meta

    def _blocked_ids(self, s: CachedRequestState) -> set[int]:
        """EOS and stop ids are forbidden until a request has min_tokens outputs."""
        p = s.sampling_params
        if s.num_output_tokens >= p.min_tokens:
            return set()
        ids = set(p.stop_token_ids or ())
        if not p.ignore_eos:
            ids.update(self.info.eos_token_ids)
        return ids


def _uses_token_values(p: SamplingParams) -> bool:
    """Sampling that reads the generated tokens' values (not just their number) on the host."""
    return p.repetition_penalty != 1.0 or bool(p.presence_penalty) or bool(p.frequency_penalty)


def _logprob_lists(ids_t: torch.Tensor, vals_t: torch.Tensor, ranks_t: torch.Tensor) -> list:
    """Per row: (token, logprob, rank) with the sampled token first (its true rank), then top-N ranked 1..N."""
    rows = []
    for tid, val, rank in zip(ids_t.tolist(), vals_t.tolist(), ranks_t.tolist()):
        rows.append([(tid[0], val[0], rank)] + [(t, v, k + 1) for k, (t, v) in enumerate(zip(tid[1:], val[1:]))])
    return rows
