"""The engine core: one scheduler + KV cache manager driving the workers, step by step.

The offline `LLM` calls it in-process; the server runs the same class in its own process behind sockets.

One step (vLLM v1's shape): `schedule()` -> `executor.execute_model(scheduler_output)` (the forward is launched,
nothing waits) -> while it runs, the grammar bitmask for the scheduled requests is built here ->
`executor.sample_tokens(grammar_output)` -> `update_from_output` once the step's tokens are back -> the proposer
drafts the next step's speculative tokens. With async scheduling up to two steps are in flight: step N+1 is
launched before step N's tokens are applied. A large constrained batch's fill then runs on a thread while step()
returns and while the next step() schedules; that step() samples it before the next launch.
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
import time
import weakref
from collections import deque
from typing import Protocol

from vllm_lite.config import EngineConfig
from vllm_lite.core.scheduler import Scheduler
from vllm_lite.executor import Executor, InProcExecutor
from vllm_lite.model_loader import ModelInfo
from vllm_lite.protocol import EngineCoreOutput, EngineCoreOutputs, EngineCoreRequest, GrammarOutput, SchedulerOutput
from vllm_lite.request import Request, RequestStatus
from vllm_lite.spec_decode.adaptive import AdaptiveDraftLength
from vllm_lite.spec_decode.factory import make_proposer
from vllm_lite.spec_decode.metrics import SpecDecodeLogger
from vllm_lite.spec_decode.worker_drafts import WorkerDrafts
from vllm_lite.structured_output.manager import StructuredOutputManager

logger = logging.getLogger("vllm_lite.engine")


class Proposer(Protocol):
    """Drafts speculative tokens for a request whose tokens are all known (spec_decode/ holds the real ones)."""

    def propose(self, request: Request, max_tokens: int) -> list[int]: ...


class GrammarBitmaskBuilder(Protocol):
    """Builds a step's packed grammar bitmask on the engine core while the forward runs (None: no constrained
    request in the step). The real one is structured_output's StructuredOutputManager (the scheduler advances each
    request's grammar with the tokens a step produced); tests pass simpler ones."""

    def bitmask(self, scheduler_output: SchedulerOutput) -> GrammarOutput | None: ...


class EngineCore:
    def __init__(self, config: EngineConfig, info: ModelInfo, executor: Executor | None = None,
                 proposer: Proposer | None = None, grammar: GrammarBitmaskBuilder | None = None) -> None:
        # The real grammar builder (xgrammar): compiles requests' constraints and owns their matchers.
        structured = grammar if isinstance(grammar, StructuredOutputManager) else None
        if proposer is None:
            proposer = make_proposer(config.speculative, info, structured)
        if proposer is None and config.speculative.uses_model:  # drafts come back from the worker
            proposer = WorkerDrafts()
        if config.speculative.enabled and proposer is None and not config.speculative.uses_model:
            raise ValueError(f"num_speculative_tokens={config.speculative.num_speculative_tokens} needs a draft "
                             f"proposer: set speculative_config's method (ngram, suffix, grammar, draft_model, eagle, eagle3)")
        self.config = config
        self.info = info
        t0 = time.perf_counter()
        self.executor = executor if executor is not None else InProcExecutor(config, info)
        num_blocks = self.executor.determine_num_blocks()  # waits for the workers' model load, then profiles
        self.executor.initialize_kv_cache(num_blocks)
        t1 = time.perf_counter()
        self.num_blocks = num_blocks
        self.num_spec_tokens = config.speculative.num_speculative_tokens if proposer is not None else 0
        # k lookahead KV slots past each request's scheduled tokens: an in-worker drafter writes its drafts' KV
        # there, and the worker pads a verification step's requests to 1 + k tokens (one CUDA graph shape).
        lookahead = self.num_spec_tokens
        self.scheduler = Scheduler(config.scheduler, config.cache, num_blocks, info.max_model_len,
                                   speculative=self.num_spec_tokens > 0, num_lookahead_tokens=lookahead)
        self.proposer = proposer
        # Where the worker replays CUDA graphs it pads a verification step to 1 + k tokens per request, so fewer
        # drafts cost as much as k: the adaptive rule then asks for k or none. Not with verify_as_decode (its decode
        # graphs take any number of rows), unless a drafter model proposes in the worker: its device proposals need
        # every request at k drafts (or none).
        graph_shaped = (self.num_spec_tokens > 0 and config.device.replays_cuda_graphs()
                        and (not config.kernels.verify_as_decode or config.speculative.uses_model))
        self.draft_policy = AdaptiveDraftLength(config.speculative, all_or_none=graph_shaped)
        # the policy's measured costs need the step times (speculating engines only: plain steps skip this)
        self._time_steps = proposer is not None and self.draft_policy.costs is not None
        self.spec_logger = SpecDecodeLogger()
        self._not_speculated: weakref.WeakSet[Request] = weakref.WeakSet()  # logged once each
        self.grammar = grammar
        self.structured = structured
        if self.structured is not None:
            self.structured.host_buffer = self.executor.grammar_host_buffer
        self._deferred_sample: cf.Future | None = None  # a launched step's bitmask fill, sampled next step()
        self.in_flight: deque[SchedulerOutput] = deque()
        self._step_calls = 0
        self._clock = time.perf_counter  # step timing for the draft policy (tests substitute a clock)
        self._last_apply: tuple[float, int] | None = None  # (time, step() call) of the last applied step
        self.max_in_flight = 2 if config.scheduler.async_scheduling else 1
        # Where the device runs asynchronously (and so does scheduling), a step applied with nothing left in flight
        # (speculating requests wait for their tokens) is followed at once by the next launch (`_launch_ahead`).
        self.launch_ahead = config.device.resolved_device() == "cuda" and self.max_in_flight > 1
        eos = tuple(info.eos_token_ids)
        self._default_eos = eos[0] if eos else None
        self._all_eos = eos
        logger.info("engine ready in %.2f s (model load, profiling, KV cache of %d blocks, CUDA graphs)",
                    t1 - t0, num_blocks)

    def add_request(self, req: EngineCoreRequest) -> None:
        """Queue a request; raises ValueError (e.g. prompt longer than the context) before anything is queued."""
        eos = req.eos_token_id if req.eos_token_id is not None else self._default_eos
        request = Request(req.request_id, req.prompt_token_ids, req.sampling_params, eos_token_id=eos,
                          arrival_time=req.arrival_time, extra_eos_token_ids=self._all_eos)
        if req.sampling_params.structured_outputs is not None:
            if self.structured is None:
                raise ValueError("structured_outputs needs the engine's tokenizer (this engine has none: "
                                 "skip_tokenizer_init)")
            self.structured.add_request(request, self.scheduler.add_request)  # checks it; may wait for a compile
            return
        self.scheduler.add_request(request)

    def abort_requests(self, request_ids: list[str]) -> list[EngineCoreOutput]:
        """Abort now; returns an output (finish_reason "abort", the request's timings) per request stopped."""
        return self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prompt prefix (later requests compute their prompts again): benchmarks that compare
        runs of the same prompts start each from the same cold cache."""
        return self.scheduler.reset_prefix_cache()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self.in_flight)

    def step(self) -> EngineCoreOutputs:
        """Launch the next step, then apply the oldest step in flight once `max_in_flight` are out (1: every step
        is launched and applied at once; 2: step N+1 is launched before step N's tokens are applied). A schedule
        with nothing to run while a step is in flight (speculating requests wait for their accepted tokens) is
        not launched: the step in flight is applied instead."""
        launched = False
        applied = errors = None
        self._step_calls += 1
        # The last step's bitmask fill, overlapped with the caller's work and with this schedule() (which does not
        # touch the matchers; clipping drafts does, so with drafts it is sampled first).
        deferred, self._deferred_sample = self._deferred_sample, None
        if deferred is not None and self.num_spec_tokens:
            self.executor.sample_tokens(self._wait_fill(deferred))
            deferred = None
        if self.structured is not None:
            errors = self._poll_grammars()
        scheduler_output = self.scheduler.schedule() if self.scheduler.has_unfinished_requests() else None
        if deferred is not None:  # sampled before the next launch (the device's logits and inputs follow it)
            self.executor.sample_tokens(self._wait_fill(deferred))
        if scheduler_output is not None:
            if scheduler_output.total_num_scheduled_tokens or not self.in_flight:
                self.executor.execute_model(scheduler_output)
                if self.in_flight and self.structured is not None \
                        and self.structured.needs_applied_tokens(scheduler_output):
                    # A constrained request's previous token is still in flight: its mask must follow that token,
                    # so the previous step is applied first (its forward overlaps this one's launch).
                    applied = self._apply_oldest()
                if applied is not None and self.structured is not None:
                    # This step() returns outputs now: a large fill runs while the caller handles them, and the
                    # step is sampled at the start of the next step() (nothing else uses the matchers until then).
                    grammar_output = self.structured.bitmask(scheduler_output, defer=True)
                else:
                    grammar_output = self.grammar.bitmask(scheduler_output) if self.grammar is not None else None
                if isinstance(grammar_output, cf.Future):
                    self._deferred_sample = grammar_output
                else:
                    self.executor.sample_tokens(grammar_output)
                self.in_flight.append(scheduler_output)
                launched = True
            else:
                self.scheduler.requeue_finished(scheduler_output.finished_req_ids)
        # A step just launched stays in flight while another can be launched beside it; when every request waits for
        # its outputs (speculating at small batch) it is applied now rather than after an empty schedule.
        if applied is None and (not self.in_flight or (launched and len(self.in_flight) < self.max_in_flight
                                                       and not self.scheduler.only_waiting_on_outputs())):
            applied = EngineCoreOutputs(scheduler_stats=self.scheduler.make_stats())
        if applied is None:
            applied = self._apply_oldest()
            if self.launch_ahead and not self.in_flight and self._no_constrained_requests() \
                    and self.scheduler.has_unfinished_requests():
                self._launch_ahead()
        if errors:
            applied.outputs = errors + applied.outputs
        return applied

    @staticmethod
    def _wait_fill(future: cf.Future) -> GrammarOutput:
        """A deferred fill's result: how long this waits is the fill that did not overlap the caller's work
        (StepBreakdown's `fill_wait`)."""
        return future.result()

    def _no_constrained_requests(self) -> bool:
        """No request has (or waits for) a grammar. Engines with a tokenizer always have the manager, so its mere
        presence must not turn launch-ahead off (it did: the default model never launched ahead)."""
        s = self.structured
        return s is None or not (s.requests or s.compiling)

    def _launch_ahead(self) -> None:
        """Launch the next step before the applied one's outputs go back, so that the caller's output handling
        (detokenizing, sending to the API server) overlaps the device instead of delaying the next launch. The next
        step() then finds the speculating requests waiting on it and applies it. Not while a request has a grammar:
        drafts are clipped to the grammar at the start of step(), before scheduling."""
        scheduler_output = self.scheduler.schedule()
        if not scheduler_output.total_num_scheduled_tokens:
            self.scheduler.requeue_finished(scheduler_output.finished_req_ids)
            return
        self.executor.execute_model(scheduler_output)
        self.executor.sample_tokens(self.grammar.bitmask(scheduler_output) if self.grammar is not None else None)
        self.in_flight.append(scheduler_output)

    def _poll_grammars(self) -> list[EngineCoreOutput]:
        """Requests whose grammar compiled join the schedule (failed ones end, returned); drafts a grammar refuses
        are cut before they are scheduled. With nothing else to run, waits briefly for a compile."""
        scheduler = self.scheduler
        idle = not self.in_flight and not scheduler.running and len(self.structured.compiling) >= len(
            scheduler.waiting)
        errors = self.structured.poll(scheduler, idle)
        if self.num_spec_tokens:
            for request in self.structured.requests.values():
                if request.spec_token_ids:
                    self.structured.clip_drafts(request)
        return errors

    def _apply_oldest(self) -> EngineCoreOutputs:
        """Apply the oldest step in flight: its tokens, stop checks, then the proposer's drafts."""
        scheduler_output = self.in_flight.popleft()
        model_output = self.executor.get_output()
        if self._time_steps:
            self._time_step(scheduler_output)
        outputs = self.scheduler.update_from_output(scheduler_output, model_output)
        if self.proposer is not None:
            if isinstance(self.proposer, WorkerDrafts):
                self.proposer.take(model_output)
            self._propose(scheduler_output, outputs)
            if outputs.scheduler_stats is not None:
                self.spec_logger.maybe_log(outputs.scheduler_stats, self._spec_log_extra())
        return outputs

    def _time_step(self, scheduler_output: SchedulerOutput) -> None:
        """The time since the previous applied step (host work, waits and device time: the engine's cadence), for
        the draft policy's measured costs; only consecutive decode or verification steps count, no prefill."""
        now = self._clock()
        last, self._last_apply = self._last_apply, (now, self._step_calls)
        if last is None or self._step_calls - last[1] > 1 or now - last[0] > 1.0 or scheduler_output.scheduled_new_reqs:
            return
        spec = scheduler_output.scheduled_spec_decode_tokens
        n = len(scheduler_output.num_scheduled_tokens)
        lengths = [len(d) for d in spec.values()]
        if n and scheduler_output.total_num_scheduled_tokens == n + sum(lengths):  # 1 + drafts each: no prefill
            self.draft_policy.observe_step(n, max(lengths, default=0), now - last[0])

    def _propose(self, scheduler_output: SchedulerOutput, outputs: EngineCoreOutputs) -> None:
        """Drafts for the requests of an applied step that are still running with all their tokens known; how many
        each gets is the adaptive rule's choice (spec_decode/adaptive.py), capped so that verification stays exact:
        a request below min_tokens verifies only rows that all still block EOS (the worker blocks every row of
        such a request). Penalties are exact (each verified row counts the drafts before it); multi-token bad words
        are not, so those requests are not speculated (logged once per request)."""
        policy = self.draft_policy
        verified = {o.request_id: o for o in outputs.outputs if o.num_draft_tokens}
        for req_id, out in verified.items():
            request = self.scheduler.requests.get(req_id)
            if request is not None:
                policy.observe(request, out.num_draft_tokens, out.num_accepted_tokens)
        allowed = policy.allows(len(self.scheduler.running))
        if not isinstance(self.proposer, WorkerDrafts):  # paused: every request runs ahead (async overlap)
            self.scheduler.speculative = allowed
        if not allowed:
            return
        candidates: list[Request] = []
        for req_id in scheduler_output.num_scheduled_tokens:
            request = self.scheduler.requests.get(req_id)
            if (request is None or request.status != RequestStatus.RUNNING
                    or request.num_computed_tokens + 1 < request.num_tokens):  # gone, preempted or mid-prefill
                continue
            if request.sampling_params.has_multi_token_bad_words:
                if request not in self._not_speculated:
                    self._not_speculated.add(request)
                    logger.info("request %s is not speculated: bad words of several tokens depend on each draft "
                                "before them", req_id)
                policy.idle([request])
                continue
            if request.num_output_placeholders and not policy.probe_due(request):
                continue  # running ahead, not probed this step
            candidates.append(request)
        if not candidates:
            return
        lengths = policy.draft_lengths(candidates, len(self.scheduler.running))
        idle = []
        for request, n in zip(candidates, lengths.tolist()):
            below = request.sampling_params.min_tokens - len(request.output_token_ids)
            if below > 0:
                n = min(n, below - 1)
            drafts = self.proposer.propose(request, n)[:n] if n > 0 else []
            if request.num_output_placeholders:  # running ahead: a probe on its known tokens
                if drafts:
                    policy.drafted(request)  # drafts are likely: its next step waits, then it drafts
                else:
                    policy.probe_missed(request)
                    idle.append(request)
                continue
            request.spec_token_ids = list(drafts)
            if drafts:
                policy.drafted(request)
            else:
                idle.append(request)
        policy.idle(idle)

    def _spec_log_extra(self) -> str:
        off = self.draft_policy.num_turned_off
        return f", {off} request(s) drafting nothing for low acceptance" if off else ""

    def shutdown(self) -> None:
        if self._deferred_sample is not None:
            self._deferred_sample.result()
            self._deferred_sample = None
        if self.structured is not None:
            self.structured.shutdown()
        self.executor.shutdown()
