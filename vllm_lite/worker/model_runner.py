"""Runs one step on the device: keeps per-request state, builds flat inputs, runs the model and samples.

A step is two calls: `execute_model` (inputs, forward, logits of the rows that sample: 1 per request, or 1 + k
when it verifies k speculative tokens) and `sample_tokens` (grammar bitmask, sampling or rejection sampling, the
copy of the tokens to the host). Nothing waits for the device until `get_output`. Inputs are built from numpy
arrays with per-request (never per-token) Python work and copied to the device once.
"""
from __future__ import annotations

import itertools
import logging
import time
from collections import deque

import numpy as np
import torch

from vllm_lite.attention import AttentionContext, StepMetadata
from vllm_lite.attention.selector import make_backend
from vllm_lite.compile.compiler import compile_model
from vllm_lite.compile.cuda_graphs import CUDAGraphRunner, measure_graph_memory, outputs_bytes
from vllm_lite.config import DEFAULT_CPU_KV_CACHE_BYTES, EngineConfig
from vllm_lite.distributed import TPGroup
from vllm_lite.kernels.bitmask import warm_up_bitmask_kernel
from vllm_lite.kernels.cdf_sample import warm_up_cdf_sample
from vllm_lite.kernels.rejection_sampler import warm_up_verify_kernel
from vllm_lite.layers.linear import kv_heads_of_rank
from vllm_lite.model_loader import ModelInfo, load_model
from vllm_lite.protocol import GrammarOutput, ModelRunnerOutput, SchedulerOutput
from vllm_lite.sample.bitmask import GrammarBitmaskApplier
from vllm_lite.sample.metadata import SamplingMetadata
from vllm_lite.sample.sampler import Sampler, gather_logprobs
from vllm_lite.sample.topk_topp import skip_random_draws
from vllm_lite.sampling_params import SamplingParams
from vllm_lite.spec_decode.rejection_sampler import rejection_sample
from vllm_lite.worker.drafting import WorkerDrafting, make_drafter
from vllm_lite.worker.input_batch import InputStager
from vllm_lite.worker.prompt_logprobs import PromptLogprobsCollector
from vllm_lite.worker.request_state import CachedRequestState
from vllm_lite.worker.step_shapes import step_shapes
from vllm_lite.worker.step_output import Launch, PendingStep, resolve_launch

logger = logging.getLogger("vllm_lite.model_runner")


class ModelRunner:
    def __init__(self, config: EngineConfig, info: ModelInfo, device: torch.device,
                 tp: TPGroup | None = None) -> None:
        """`tp`: this rank's tensor-parallel group (None: one rank). Every rank runs the same steps on the same
        inputs; its model holds a shard (its heads, its KV heads), and the logits are whole on every rank, so the
        ranks sample identical tokens (same seeds, same draws)."""
        self.config = config
        self.info = info
        self.device = device
        self.tp = tp or TPGroup()
        self.block_size = config.cache.block_size
        hf = info.hf_config
        self.vocab_size = hf.vocab_size
        self.num_layers = hf.num_hidden_layers
        self.num_heads = self.tp.divide(hf.num_attention_heads, "num_attention_heads")
        self.num_kv_heads = kv_heads_of_rank(getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
                                             self.tp)[0]
        self.head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        sched = config.scheduler
        # k lookahead slots past the scheduled tokens (the engine core reserves them): an in-worker drafter's KV, and
        # the padding of a verification step's requests to 1 + k tokens.
        lookahead = config.speculative.num_speculative_tokens
        self.max_blocks_per_seq = -(-(info.max_model_len + lookahead) // self.block_size)
        self.shapes = step_shapes(config, lookahead, self.block_size)
        self.attn_ctx = AttentionContext(make_backend(  # sized for the stager's requests (rows, verify_as_decode)
            config.device.attention_backend, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim, scale=self.head_dim ** -0.5, dtype=info.dtype, device=device,
            max_num_seqs=self.shapes.stager_requests, max_blocks_per_seq=self.max_blocks_per_seq,
            kernels=config.kernels))
        logger.info("attention backend: %s", self.attn_ctx.backend.name)
        self.model: torch.nn.Module | None = None
        self.drafting: WorkerDrafting | None = None  # the in-worker drafter (draft model, EAGLE), set at load
        self.sampler = Sampler(config.kernels)
        self.grammar_bitmask = GrammarBitmaskApplier(device)
        # Speculative tokens per request in a verification step: CUDA graphs are also captured for 1 + k.
        self.num_spec_tokens = config.speculative.num_speculative_tokens
        self.requests: dict[str, CachedRequestState] = {}
        self.prompt_logprobs = PromptLogprobsCollector()  # idle unless a request asks for prompt logprobs
        self._sampling_key: tuple[str, ...] | None = None
        self._sampling_cached: SamplingMetadata | None = None
        self.pending: deque[Launch] = deque()  # sampled steps whose output was not returned yet
        self._step: PendingStep | None = None  # executed, not sampled yet
        self._launches = 0
        self.pad_verification = False  # set once CUDA graphs are captured (initialize_kv_cache)
        self._last_sampled: torch.Tensor | None = None
        self._inputs_consumed: torch.cuda.Event | None = None
        self.num_blocks = 0
        self.stager = InputStager(max(sched.max_num_batched_tokens, sched.max_num_seqs * (1 + self.num_spec_tokens)),
                                  self.shapes.stager_requests, self.max_blocks_per_seq, self.block_size, device)

    def load_model(self) -> None:
        start = time.perf_counter()
        torch.manual_seed(self.config.model.seed)
        self.model = load_model(self.info, self.config.load, self.device, self.attn_ctx,
                                kernels=self.config.kernels, tp=self.tp)
        logger.info("model loaded in %.2f s", time.perf_counter() - start)
        drafter = make_drafter(self.config, self.info, self.device, self.max_blocks_per_seq)
        self.drafting = WorkerDrafting(drafter) if drafter is not None else None
        if drafter is not None:  # before compiling: the aux hidden-state layers are static for torch.compile
            if drafter.aux_hidden_layers:
                self.model.set_aux_hidden_state_layers(drafter.aux_hidden_layers)
            drafter.load(self.model)
        # torch.compile and CUDA graphs are the CUDA fast path; CPU runs stay eager (compiling costs more there
        # than it saves for development and tests).
        self.use_compile = self.device.type == "cuda" and not self.config.device.enforce_eager
        self.forward = compile_model(self.model, self.config) if self.use_compile else self.model.forward
        if self.config.device.inductor_cpp_wrapper and not self.use_compile:
            logger.warning("inductor_cpp_wrapper has no effect: the model runs eager here (CPU or enforce_eager)")
        self.use_cuda_graphs = self.use_compile and self.attn_ctx.backend.supports_cuda_graphs
        self.graphs: CUDAGraphRunner | None = None
        self.capture_sizes, self.graph_query_lens = self.shapes.capture_sizes, self.shapes.graph_query_lens

    # ---- KV cache sizing -------------------------------------------------------------------------------------
    def kv_bytes_per_block(self) -> int:
        """Of this rank's KV heads (the executor takes the minimum block count over the ranks)."""
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
        if self.drafting is not None:  # the drafter's KV cache has the same blocks
            per_block += self.drafting.drafter.kv_bytes_per_block()
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
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
            self.model.compute_logits(hidden[-self.config.scheduler.max_num_seqs:]).float()  # + the sampler's copy
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        graph_bytes = 0
        if self.use_cuda_graphs:
            prefill = self.shapes.prefill_sizes
            graph_bytes = measure_graph_memory(self.forward, max(self.capture_sizes), self.device,
                                               self.info.hf_config.hidden_size, self.info.dtype,
                                               self._prepare_capture, query_len=max(self.graph_query_lens),
                                               prefill_size=max(prefill, default=0))
            sizes = self.shapes.graph_token_sizes()
            graph_bytes += outputs_bytes(sizes, self.info.hf_config.hidden_size, self.info.dtype)
            # one graph-mode attention state (FlashInfer wrapper) per graph
            graph_bytes += sum(map(len, sizes.values())) * self.attn_ctx.backend.graph_state_bytes
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
                                          self.info.hf_config.hidden_size, self.info.dtype,
                                          query_lens=self.graph_query_lens, prefill_sizes=self.shapes.prefill_sizes,
                                          prefill_slots=self.shapes.prefill_slots)
            self.graphs.capture(self._prepare_capture)
        if self.drafting is not None:
            self.drafting.drafter.initialize_kv_cache(num_blocks)
        warm_up_bitmask_kernel(self.vocab_size, self.device, self.info.dtype)  # Triton compiles before serving
        warm_up_cdf_sample(self.vocab_size, self.device, self.info.dtype)
        if self.num_spec_tokens:
            warm_up_verify_kernel(self.num_spec_tokens, self.vocab_size, self.device,
                                  draft_probs=self.drafting is not None)
        # A verification step whose requests verify fewer than k drafts (or none) is padded to 1 + k tokens each,
        # so it replays the 1 + k graph: without one a step costs ~10x (H200, batch 1: 25.6 ms against 2.27 ms).
        # Not with an in-worker drafter, which reads the step's hidden states by the requests' real tokens.
        self.pad_verification = (self.graphs is not None and 1 + self.num_spec_tokens in self.graph_query_lens
                                 and self.num_spec_tokens > 0 and self.drafting is None)

    def _prepare_graph_step(self, meta: StepMetadata, num_tokens: int, key: int) -> None:
        """key: the graph's tokens per request, or a prefill graph's -R (R request slots)."""
        kwargs = {"prefill_slots": -key} if key < 0 else {}
        self.attn_ctx.metadata = self.attn_ctx.backend.prepare(meta, graph_batch_size=num_tokens, **kwargs)

    def _prepare_capture(self, num_tokens: int, key: int, slot_mapping: torch.Tensor) -> None:
        """Plan a dummy batch for capture, writing nowhere (slot_mapping is all -1): num_tokens // key requests of
        key tokens in block 0 (seq_len key), or for a prefill graph of R slots R one-token requests and the padding."""
        meta = StepMetadata.for_capture(-key if key < 0 else num_tokens, max(key, 1), slot_mapping, self.block_size)
        self._prepare_graph_step(meta, num_tokens, key)

    # ---- one step --------------------------------------------------------------------------------------------
    def _update_states(self, so: SchedulerOutput) -> None:
        for req_id in so.finished_req_ids:
            self.requests.pop(req_id, None)
            self.prompt_logprobs.drop(req_id)
        for data in so.scheduled_new_reqs:
            state = CachedRequestState(data, self.device)
            self.prompt_logprobs.add(data)
            if state.generator is not None and state.num_output_tokens and not data.sampling_params.greedy:
                skip_random_draws(state.generator, state.num_output_tokens, self.vocab_size, self.device)
            self.requests[data.req_id] = state
        for data in so.scheduled_cached_reqs:
            state = self.requests[data.req_id]
            if data.new_block_ids:
                state.add_blocks(data.new_block_ids)
            state.num_computed_tokens = data.num_computed_tokens

    def _wait_inputs_consumed(self) -> None:
        """The host staging buffer and FlashInfer's page-locked plan buffer are reused: wait until the device has
        read the previous step's copies (recorded after them, in stream order after the step before's sampling).
        A device behind the host shows up here (StepBreakdown times it as `inputs_wait`)."""
        if self._inputs_consumed is not None:
            self._inputs_consumed.synchronize()

    @torch.inference_mode()
    def execute_model(self, so: SchedulerOutput) -> None:
        """Phase one of a step: inputs, forward and logits of the sampling rows are launched (nothing waits for the
        device); `sample_tokens` then samples them, `get_output` returns the results."""
        self._wait_inputs_consumed()
        self._update_states(so)
        self._launches += 1
        req_ids = list(so.num_scheduled_tokens)
        if not req_ids:
            self._step = PendingStep(Launch(self._launches, [], [], output=ModelRunnerOutput([], [], [])))
            return
        states = [self.requests[r] for r in req_ids]
        if any(s.pending and _uses_token_values(s.sampling_params) for s in states):
            self._resolve_all()  # penalties need the values of the tokens still on the device
        query_lens = np.fromiter(so.num_scheduled_tokens.values(), dtype=np.int64, count=len(req_ids))
        starts = np.fromiter((s.num_computed_tokens for s in states), dtype=np.int64, count=len(states))
        ends = starts + query_lens
        # Only requests whose scheduled tokens reach the end of what is known (+ drafts) sample; partial prefills
        # do not. A request verifying k drafts samples at its last 1 + k tokens.
        known = np.fromiter((s.num_tokens for s in states), dtype=np.int64, count=len(states))
        spec = so.scheduled_spec_decode_tokens
        sample_drafts = counts = None
        if spec:
            num_drafts = np.zeros(len(states), dtype=np.int64)
            for i, r in enumerate(req_ids):
                drafts = spec.get(r)
                if drafts:
                    states[i].stage_drafts(drafts)
                    num_drafts[i] = len(drafts)
            known += num_drafts
        sample_rows = np.flatnonzero(ends >= known)
        if spec:
            sample_drafts = num_drafts[sample_rows]
            counts = sample_drafts + 1
        pad_to = self._verification_padding(states, starts, query_lens, counts, sample_rows) if spec else 0
        token_slices = [s.token_buffer[st:e] for s, st, e in zip(states, starts.tolist(), ends.tolist())]
        sample_ends = None
        if pad_to:  # every request computes pad_to tokens: its own, then ids 0 whose rows are never sampled
            token_slices = [t if len(t) == pad_to else np.concatenate([t, np.zeros(pad_to - len(t), t.dtype)])
                            for t in token_slices]
            sample_ends = np.arange(len(states), dtype=np.int64) * pad_to + query_lens
            query_lens = np.full(len(states), pad_to, dtype=np.int64)
        fill_dst, fill_src = self._device_token_fills(states, starts, ends, query_lens)
        # Steady decode: token i is row i of the previous launch's ids, one copy instead of a gather + scatter.
        # (dst is increasing, so dst[0] == 0 and dst[-1] == len - 1 make it 0..k-1.)
        in_order = fill_dst is not None and fill_dst[0] == 0 and fill_dst[-1] == len(fill_dst) - 1 \
            and bool(np.array_equal(fill_dst, fill_src))
        # KernelConfig.verify_as_decode: a verification step's tokens attend as one-token requests (decode kernel,
        # decode graphs) instead of FlashInfer's prefill kernel over 1 + k-token requests.
        rows = (bool(spec) and self.config.kernels.verify_as_decode
                and int(query_lens.max()) <= 1 + self.num_spec_tokens and int(query_lens.sum()) <= self.stager.max_reqs)
        inputs = self.stager.stage(token_slices, starts, query_lens, [s.block_ids for s in states], sample_rows,
                                   *((None, None) if in_order else (fill_dst, fill_src)), sample_counts=counts,
                                   sample_ends=sample_ends, rows_as_requests=rows)
        if in_order:
            inputs.input_ids[: len(fill_dst)].copy_(self._last_sampled[: len(fill_dst)])
        elif inputs.fill_dst is not None:
            inputs.input_ids[inputs.fill_dst] = self._last_sampled[inputs.fill_src].to(inputs.input_ids.dtype)
        meta = inputs.meta
        # The graph this step replays: a uniform decode / verification step, or a short prefill step of few requests.
        graph = None if self.graphs is None else self.graphs.graph_for(meta.num_reqs, meta.num_tokens,
                                                                        meta.max_query_len)
        use_graph = graph is not None
        if use_graph:
            self._prepare_graph_step(meta, graph[1], graph[0])
        else:
            self.attn_ctx.set_step(meta)
        if self.device.type == "cuda":
            self._inputs_consumed = torch.cuda.Event()
            self._inputs_consumed.record()
        if use_graph:
            hidden = self.graphs.run(inputs.input_ids, inputs.positions, meta.num_tokens, meta.slot_mapping, *graph)
        else:
            hidden = self.forward(inputs.input_ids, inputs.positions)
        rows = sample_rows.tolist()
        step = PendingStep(Launch(self._launches, req_ids, rows,
                                  num_drafts=None if sample_drafts is None else sample_drafts.tolist()))
        if isinstance(hidden, tuple):  # the model also returns chosen intermediate hidden states
            hidden, aux = hidden
            step.aux_hidden_states = [a[: meta.num_tokens] for a in aux]
        if self.prompt_logprobs.active:
            self.prompt_logprobs.collect(self._launches, hidden, req_ids, starts, query_lens,
                                         self.model.compute_logits)
        if self.drafting is not None:  # what the drafter reads once the step's tokens are known
            step.all_states, step.starts, step.query_lens = states, starts, query_lens
            step.hidden = hidden[: meta.num_tokens] if self.drafting.drafter.needs_hidden else None
        if rows:
            # Every token samples (plain decode, or all rows of a uniform verification): no gather needed.
            all_rows = len(inputs.logits_indices) == meta.num_tokens
            step.logits = self.model.compute_logits(hidden[: meta.num_tokens] if all_rows
                                                    else hidden[inputs.logits_indices])
            step.states = [states[i] for i in rows]
            if sample_drafts is not None:
                # Always k columns (-1 padded): one compiled verification kernel, and a seeded request draws the
                # same number of uniforms per step whatever the others in the batch draft.
                drafts = np.full((len(rows), self.num_spec_tokens), -1, dtype=np.int64)
                for j, (state, k) in enumerate(zip(step.states, sample_drafts.tolist())):
                    drafts[j, :k] = state.token_buffer[state.num_tokens: state.num_tokens + k]
                step.drafts = _pinned(torch.from_numpy(drafts)).to(self.device, non_blocking=True)
        self._step = step

    @torch.inference_mode()
    def sample_tokens(self, grammar: GrammarOutput | None = None) -> None:
        """Phase two: apply the step's grammar bitmask (if any), sample or verify drafts, and start copying the
        tokens to the host (non-blocking)."""
        step, self._step = self._step, None
        if step is None:
            raise RuntimeError("sample_tokens called without a step launched by execute_model")
        launch = step.launch
        if step.logits is None:
            self.pending.append(launch)
            if self.drafting is not None and launch.req_ids:  # prefill chunks: the drafter's KV follows
                self._propose_drafts(step)
            return
        states = step.states
        meta = self._sampling_metadata(states)
        if grammar is not None:  # disallowed tokens become -inf in the constrained rows, in place
            ids, drafts = launch.req_ids, launch.num_drafts  # every request samples (steady decode): rows 0..n-1
            if len(launch.rows) != len(ids):
                ids = [ids[i] for i in launch.rows]
            self.grammar_bitmask.apply(step.logits, grammar, ids, None if drafts is None else _row_offsets(drafts))
        if step.drafts is None:
            out = self.sampler(step.logits, meta, logits_owned=True)
            sampled, row_tokens = out.sampled_token_ids, None
            self._last_sampled = sampled
            logprob_out = out
        else:
            q = None if self.drafting is None else self.drafting.draft_probs(states, launch.num_drafts, step.drafts,
                                                                              self.vocab_size)
            sampled, row_tokens = rejection_sample(step.logits, meta, step.drafts, launch.num_drafts, None,
                                                   self.config.kernels.sampling_kernel,
                                                   **({} if q is None else {"draft_probs": q}),
                                                   want_row_tokens=meta.max_num_logprobs is not None)
            self._last_sampled = sampled[:, 0]
            logprob_out = None
        tensors = [sampled]
        if meta.max_num_logprobs is not None:
            if logprob_out is None:  # raw logprobs at every verified row, of the token that row produced
                raw = torch.log_softmax(step.logits.float(), dim=-1)
                tensors += list(gather_logprobs(raw, meta.max_num_logprobs, row_tokens))
            else:
                tensors += [logprob_out.logprob_token_ids, logprob_out.logprobs, logprob_out.ranks]
            launch.num_logprobs = [s.sampling_params.logprobs for s in states]
        launch.host = [t.to("cpu", non_blocking=True) for t in tensors]
        if self.device.type == "cuda":
            launch.done = torch.cuda.Event()
            launch.done.record()
        number = launch.number
        if launch.num_drafts is None:  # one row per request: every token fills a placeholder
            launch.positions = [s.add_placeholder(number, j) for j, s in enumerate(states)]
        else:
            launch.row_offsets = _row_offsets(launch.num_drafts)[:-1]
            launch.positions = [s.add_placeholder(number, j) if k == 0 else -1
                                for j, (s, k) in enumerate(zip(states, launch.num_drafts))]
        self.pending.append(launch)
        if self.drafting is not None:
            self._propose_drafts(step, sampled)

    def _propose_drafts(self, step: PendingStep, verified: torch.Tensor | None = None) -> None:
        """The in-worker drafter's next drafts, from this step's tokens and hidden states: on the device without
        waiting where the step qualifies (`verified`: its sampled tokens; a uniform verification or decode step),
        else from the tokens on the host (waits for them)."""
        launch = step.launch
        if (verified is not None and len(launch.rows) == len(step.all_states)
                and self.drafting.propose_padded(launch.number, step.all_states, step.starts, step.query_lens,
                                                 launch.num_drafts, verified, step.hidden, step.aux_hidden_states)):
            return
        self._resolve_all()
        self.drafting.propose(launch.number, step.all_states, step.starts, step.query_lens, launch.rows,
                              step.hidden, step.aux_hidden_states)

    def get_output(self) -> ModelRunnerOutput:
        """Results of the oldest sampled step not yet returned (waits for its sampled ids)."""
        launch = self.pending.popleft()
        output = resolve_launch(launch, self.requests)
        self.prompt_logprobs.attach(launch.number, output)
        if self.drafting is not None:
            self.drafting.attach(launch.number, output)
        return output

    def output_ready(self) -> bool:
        """The oldest sampled step's ids are on the host (get_output would not wait for the device)."""
        launch = self.pending[0]
        return launch.output is not None or launch.done is None or launch.done.query()

    def _resolve_all(self) -> None:
        for launch in self.pending:
            resolve_launch(launch, self.requests)

    def _verification_padding(self, states: list[CachedRequestState], starts: np.ndarray, query_lens: np.ndarray,
                              counts: np.ndarray, sample_rows: np.ndarray) -> int:
        """1 + k when this verification step is to be padded to that many tokens per request (every request decodes
        or verifies, not all the same count, the padded batch has a graph and the padding's KV slots are the
        request's own lookahead slots, inside the context), else 0."""
        q = 1 + self.num_spec_tokens
        n = len(states)
        if (not self.pad_verification or self.prompt_logprobs.active or len(sample_rows) != n
                or not np.array_equal(query_lens, counts) or bool((query_lens == q).all())
                or (self.graphs is not None and not self.graphs.can_run(n * q, q))
                or int(starts.max()) + q > self.info.max_model_len):
            return 0
        room = np.fromiter((len(s.block_ids) for s in states), dtype=np.int64, count=n) * self.block_size
        return q if bool((starts + q <= room).all()) else 0

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
        blocked = [s.min_tokens_blocked if s.num_output_tokens < s.sampling_params.min_tokens else ()
                   for s in states]
        meta = SamplingMetadata.build(
            params=params, prompt_token_ids=[s.prompt_token_ids if penalised else [] for s in states],
            output_token_ids=[s.output_token_ids if penalised else [] for s in states],
            generators=[s.generator for s in states], stop_ids_blocked=blocked, device=self.device,
            vocab_size=self.vocab_size)
        # Cacheable once no row is penalised or below min_tokens (outputs only grow while the batch is unchanged).
        self._sampling_key = None if penalised or any(blocked) else key
        self._sampling_cached = meta
        return meta


def _pinned(t: torch.Tensor) -> torch.Tensor:
    """Host tensors bound for CUDA go through pinned memory: a copy from pageable memory waits for the stream (the
    forward just launched) before it returns."""
    return t.pin_memory() if torch.cuda.is_available() else t


def _row_offsets(num_drafts: list[int]) -> list[int]:
    """First logits row of each sampling request (1 + k rows each), and the total as the last entry."""
    return list(itertools.accumulate((k + 1 for k in num_drafts), initial=0))


def _uses_token_values(p: SamplingParams) -> bool:
    """Sampling that reads the generated tokens' values (not just their number) on the host."""
    return (p.repetition_penalty != 1.0 or bool(p.presence_penalty) or bool(p.frequency_penalty)
            or p.has_multi_token_bad_words)
