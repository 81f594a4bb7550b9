"""Runs one step on the device: keeps per-request state, builds flat inputs, runs the model and samples.

Inputs are built from numpy arrays with per-request (never per-token) Python work and copied to the device once.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

from vllm_lite.attention import AttentionContext, StepMetadata, TorchAttentionBackend
from vllm_lite.config import DEFAULT_CPU_KV_CACHE_BYTES, EngineConfig
from vllm_lite.core.sched_output import ModelRunnerOutput, SchedulerOutput
from vllm_lite.model_loader import ModelInfo, load_model
from vllm_lite.sample.metadata import SamplingMetadata
from vllm_lite.sample.sampler import Sampler
from vllm_lite.sample.topk_topp import skip_random_draws
from vllm_lite.worker.request_state import CachedRequestState

logger = logging.getLogger("vllm_lite.model_runner")


class ModelRunner:
    def __init__(self, config: EngineConfig, info: ModelInfo, device: torch.device) -> None:
        self.config = config
        self.info = info
        self.device = device
        self.block_size = config.cache.block_size
        self.attn_ctx = AttentionContext(self._make_backend())
        self.model: torch.nn.Module | None = None
        self.sampler = Sampler()
        self.requests: dict[str, CachedRequestState] = {}
        self.num_blocks = 0
        hf = info.hf_config
        self.vocab_size = hf.vocab_size
        self.num_layers = hf.num_hidden_layers
        self.num_kv_heads = getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
        self.head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads

    def _make_backend(self) -> TorchAttentionBackend:
        name = self.config.device.attention_backend
        if name == "flashinfer":
            raise ValueError("attention_backend='flashinfer' is not available yet; use 'torch'")
        return TorchAttentionBackend()

    def load_model(self) -> None:
        start = time.perf_counter()
        torch.manual_seed(self.config.model.seed)
        self.model = load_model(self.info, self.config.load, self.device, self.attn_ctx)
        logger.info("model loaded in %.2f s", time.perf_counter() - start)

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
        tokens = torch.zeros(n, dtype=torch.long, device=self.device)
        positions = torch.arange(n, device=self.device)
        self.attn_ctx.set_step(self._metadata([n], [n], [list(range(nblk))], positions.cpu().numpy(),
                                              np.zeros(n, dtype=np.int64)))
        with torch.inference_mode():
            hidden = self.model(tokens, positions)
            self.model.compute_logits(hidden[-self.config.scheduler.max_num_seqs:])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        self.attn_ctx.kv_caches = saved
        torch.cuda.empty_cache()
        _, total = torch.cuda.mem_get_info(self.device)
        budget = int(total * self.config.cache.gpu_memory_utilization) - peak
        logger.info("profiling: peak %.2f GiB of %.2f GiB; %.2f GiB for the KV cache", peak / 2**30,
                    total / 2**30, budget / 2**30)
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
            state.block_ids.extend(data.new_block_ids)
            state.num_computed_tokens = data.num_computed_tokens

    def _metadata(self, query_lens: list[int], seq_lens: list[int], block_ids: list[list[int]],
                  positions: np.ndarray, req_index: np.ndarray) -> StepMetadata:
        num_reqs = len(query_lens)
        max_blocks = max(len(b) for b in block_ids)
        table = np.zeros((num_reqs, max_blocks), dtype=np.int32)
        for i, blocks in enumerate(block_ids):
            table[i, : len(blocks)] = blocks
        slots = table[req_index, positions // self.block_size].astype(np.int64) * self.block_size
        slots += positions % self.block_size
        qsl = np.zeros(num_reqs + 1, dtype=np.int32)
        np.cumsum(query_lens, out=qsl[1:])
        qsl_cpu = torch.from_numpy(qsl)
        seq_cpu = torch.tensor(seq_lens, dtype=torch.int32)
        return StepMetadata(
            num_reqs=num_reqs, num_tokens=int(qsl[-1]), query_start_loc=self._to_device(qsl_cpu),
            seq_lens=self._to_device(seq_cpu), block_table=self._to_device(torch.from_numpy(table)),
            slot_mapping=self._to_device(torch.from_numpy(slots)), query_start_loc_cpu=qsl_cpu,
            seq_lens_cpu=seq_cpu, max_query_len=max(query_lens), max_seq_len=max(seq_lens),
            block_size=self.block_size)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cpu":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    @torch.inference_mode()
    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        self._update_states(so)
        req_ids = list(so.num_scheduled_tokens)
        if not req_ids:
            return ModelRunnerOutput([], [], [])
        states = [self.requests[r] for r in req_ids]
        query_lens = [so.num_scheduled_tokens[r] for r in req_ids]
        starts = np.array([s.num_computed_tokens for s in states], dtype=np.int64)
        lens = np.array(query_lens, dtype=np.int64)
        req_index = np.repeat(np.arange(len(states)), lens)
        offsets = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
        positions = starts[req_index] + offsets
        input_ids = np.concatenate([s.token_ids[st: st + n] for s, st, n in zip(states, starts, query_lens)])
        seq_lens = (starts + lens).tolist()
        meta = self._metadata(query_lens, seq_lens, [s.block_ids for s in states], positions, req_index)
        self.attn_ctx.set_step(meta)
        hidden = self.model(self._to_device(torch.from_numpy(input_ids)),
                            self._to_device(torch.from_numpy(positions)))
        # Only requests whose scheduled tokens reach the end of what is known sample; partial prefills do not.
        sample_rows = [i for i, (s, end) in enumerate(zip(states, seq_lens)) if end >= s.num_tokens]
        sampled: list[list[int]] = [[] for _ in req_ids]
        logprobs: list = [None] * len(req_ids)
        if sample_rows:
            last = meta.query_start_loc_cpu[1:][sample_rows] - 1
            logits = self.model.compute_logits(hidden[last.to(self.device)])
            out = self.sampler(logits, self._sampling_metadata([states[i] for i in sample_rows]))
            tokens = out.sampled_token_ids.tolist()
            lp = _logprob_lists(out) if out.logprobs is not None else None
            for j, i in enumerate(sample_rows):
                states[i].append([tokens[j]])
                sampled[i] = [tokens[j]]
                if lp is not None and states[i].sampling_params.logprobs is not None:
                    logprobs[i] = [lp[j][: states[i].sampling_params.logprobs + 1]]
        return ModelRunnerOutput(req_ids, sampled, logprobs)

    def _sampling_metadata(self, states: list[CachedRequestState]) -> SamplingMetadata:
        blocked = []
        for s in states:
            p = s.sampling_params
            if s.num_output_tokens < p.min_tokens:
                ids = set(p.stop_token_ids or ())
                if not p.ignore_eos and self.info.eos_token_ids:
                    ids.update(self.info.eos_token_ids)
                blocked.append(ids)
            else:
                blocked.append(set())
        params = [s.sampling_params for s in states]
        penalised = any(p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty for p in params)
        return SamplingMetadata.build(
            params=params, prompt_token_ids=[s.prompt_token_ids if penalised else [] for s in states],
            output_token_ids=[s.output_token_ids if penalised else [] for s in states],
            generators=[s.generator for s in states],
            stop_ids_blocked=blocked, device=self.device, vocab_size=self.vocab_size)


def _logprob_lists(out) -> list[list[tuple[int, float, int]]]:
    """Per row: (token, logprob, rank) with the sampled token first (its true rank), then top-N ranked 1..N."""
    ids = out.logprob_token_ids.tolist()
    vals = out.logprobs.tolist()
    ranks = out.ranks.tolist()
    rows = []
    for tid, val, rank in zip(ids, vals, ranks):
        rows.append([(tid[0], val[0], rank)] + [(t, v, k + 1) for k, (t, v) in enumerate(zip(tid[1:], val[1:]))])
    return rows
