"""Continuous-batching scheduler (vLLM v1 style): one token budget per step, no prefill/decode phases.

Each request carries `num_computed_tokens`; a step gives every request `num_tokens + #spec - num_computed` tokens
(capped by the budget), RUNNING requests first (in admission order), then WAITING ones (FCFS, after a
prefix-cache lookup). `num_computed_tokens` advances at schedule time; `update_from_output` rolls back rejected
speculative tokens. Out of blocks -> preempt the last running request by recompute.

Async scheduling: step N+1 may be scheduled before step N's tokens are back. A step that samples for a request
adds an output placeholder (`num_output_placeholders`), so the next step already schedules the token after it;
`update_from_output` replaces the placeholder with the tokens that came back (1, or 1..k+1 after verifying k
speculative tokens) and runs the stop checks, one step late.

Speculative decoding: a request's draft tokens (`spec_token_ids`, set by a proposer between steps) are scheduled
as 1 + k query tokens; their KV slots (plus `num_lookahead_tokens` for an in-worker drafter) are allocated here, and
`update_from_output` rolls `num_computed_tokens` back past the rejected ones, whose slots the next step overwrites.
How many drafts are accepted is known only when the step's output is back, so while speculating a request is not
scheduled again before its previous step is applied (its steps run in order; other requests keep overlapping).
"""
from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Iterable

from vllm_lite.config import CacheConfig, SchedulerConfig
from vllm_lite.core.kv_cache_manager import KVCacheManager
from vllm_lite.protocol import (CachedRequestData, EngineCoreOutput, EngineCoreOutputs, ModelRunnerOutput,
                                NewRequestData, SchedulerOutput, SchedulerStats)
from vllm_lite.request import Request, RequestStatus

FINISHED = RequestStatus.FINISHED_STOPPED  # statuses >= this are finished (a plain int compare in the hot loop)


class Scheduler:
    """Decides, step by step, which tokens of which requests the model computes, and owns the KV block tables."""

    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig, num_blocks: int,
                 max_model_len: int, speculative: bool = False, num_lookahead_tokens: int = 0) -> None:
        """speculative: requests may carry draft tokens (their steps are then kept in order, see above);
        num_lookahead_tokens: KV slots reserved past each speculating request's scheduled tokens (for drafts an
        in-worker proposer writes in the same step)."""
        if num_blocks * cache_config.block_size < max_model_len:
            # Otherwise a single long request could preempt itself forever (the engine would hang).
            raise ValueError(
                f"max_model_len={max_model_len} needs more KV cache than available: {num_blocks} blocks of "
                f"{cache_config.block_size} tokens hold {num_blocks * cache_config.block_size} tokens; "
                f"lower max_model_len or give the KV cache more memory")
        self.scheduler_config = scheduler_config
        self.cache_config = cache_config
        self.max_num_seqs = scheduler_config.max_num_seqs
        self.max_num_batched_tokens = scheduler_config.max_num_batched_tokens
        self.max_model_len = max_model_len
        self.block_size = cache_config.block_size
        self.kv_cache_manager = KVCacheManager(num_blocks, cache_config.block_size,
                                               cache_config.enable_prefix_caching, max_model_len)
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # Finished, aborted or preempted since the last schedule(): workers drop their state (ordered set).
        self.finished_req_ids: dict[str, None] = {}
        self.num_preemptions = 0  # cumulative
        self.speculative = speculative
        self.num_lookahead_tokens = num_lookahead_tokens
        self.num_draft_tokens = 0  # cumulative: draft tokens verified
        self.num_accepted_tokens = 0  # cumulative: of those, accepted
        self.num_drafts = 0  # cumulative: verifications (a request's step with >= 1 draft)
        self._accepted_hist: list[int] = []  # cumulative: verifications by number of accepted drafts

    # ------------------------------------------------------------------ requests in / out
    def add_request(self, request: Request) -> None:
        """Queue a request; ValueError (nothing queued) for an empty or too-long prompt or a duplicate id."""
        n = request.num_prompt_tokens
        if n == 0:
            raise ValueError(f"request {request.request_id!r}: the prompt is empty; at least one token is needed")
        if n > self.max_model_len:
            raise ValueError(
                f"request {request.request_id!r}: the prompt has {n} tokens, more than the maximum context "
                f"length of {self.max_model_len} tokens")
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        request.status = RequestStatus.WAITING
        request.queued_time = time.monotonic()
        self.kv_cache_manager.update_block_hashes(request)
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_requests(self, request_ids: str | Iterable[str],
                        finished_status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> list[EngineCoreOutput]:
        """Abort (or otherwise finish) requests now: blocks are freed at once, workers hear of it next step.

        Unknown or already finished ids are ignored. Returns one EngineCoreOutput per request actually finished
        (no new tokens, finish_reason e.g. "abort"); the caller may emit or ignore them.
        """
        assert finished_status.finished
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        outputs = []
        for req_id in ids:
            request = self.requests.get(req_id)
            if request is None or request.status.finished:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            request.status = finished_status
            self._free_request(request)
            outputs.append(EngineCoreOutput(req_id, [], finish_reason=request.finish_reason,
                                            stop_reason=request.stop_reason,
                                            num_cached_tokens=max(request.num_cached_tokens, 0),
                                            timings=request.timings()))
        return outputs

    def _free_request(self, request: Request) -> None:
        self.kv_cache_manager.free(request)
        self.requests.pop(request.request_id, None)
        self.finished_req_ids[request.request_id] = None

    def _preempt(self, request: Request) -> None:
        """Preempt by recompute: drop the KV, restart from token 0 at the FRONT of the waiting queue."""
        self.kv_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.spec_token_ids = []
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        self.finished_req_ids[request.request_id] = None

    # ------------------------------------------------------------------ scheduling
    def schedule(self) -> SchedulerOutput:
        """Build one step: running requests first (decode / spec / prefill chunk), then waiting ones (FCFS)."""
        kv = self.kv_cache_manager
        budget = self.max_num_batched_tokens
        num_scheduled: dict[str, int] = {}
        spec_tokens: dict[str, list[int]] = {}
        new_reqs: list[NewRequestData] = []
        cached_reqs: list[CachedRequestData] = []
        preempted = False

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            pending = request.num_output_placeholders
            if pending and self.speculative and request.spec_wait:
                i += 1  # its accepted tokens are not back yet: next step
                continue
            num_tokens, computed = len(request.all_token_ids), request.num_computed_tokens
            drafts = request.spec_token_ids
            if drafts:  # never verify past max_tokens or the context: the last token is sampled, not drafted
                room = min(request.max_tokens - len(request.output_token_ids), self.max_model_len - num_tokens) - 1
                drafts = drafts[:max(room, 0)]
                request.spec_token_ids = []  # consumed: the proposer sets fresh ones after this step
            num_new = num_tokens + pending + len(drafts) - computed
            num_new = min(num_new, budget, self.max_model_len - computed)
            if pending and (len(request.output_token_ids) + pending >= request.max_tokens
                            or num_tokens + pending >= self.max_model_len):
                num_new = 0  # its pending token ends it: nothing more to compute
            if num_new <= 0:
                i += 1
                continue
            scheduled = True
            lookahead = self.num_lookahead_tokens  # an in-worker drafter drafts after every sampled step
            while True:
                new_blocks = kv.allocate_slots(request, num_new, num_lookahead_tokens=lookahead)
                if new_blocks is not None:
                    break
                victim = self.running.pop()  # lowest priority = admitted last
                self._preempt(victim)
                preempted = True
                if victim is request:
                    scheduled = False
                    break
            if not scheduled:
                break
            num_scheduled[request.request_id] = num_new
            budget -= num_new
            num_spec = computed + num_new - num_tokens - pending
            if num_spec > 0:
                spec_tokens[request.request_id] = drafts[:num_spec]
            cached_reqs.append(CachedRequestData(request.request_id, [b.block_id for b in new_blocks],
                                                 request.num_computed_tokens))
            self._advance(request, num_new)
            i += 1

        # No admissions in a step that had to preempt: the pool is under pressure (same as vLLM).
        compiling: list[Request] = []  # WAITING_FOR_FSM: passed over (not blocking the queue), put back after
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            if request.status == RequestStatus.WAITING_FOR_FSM:
                compiling.append(self.waiting.popleft())
                continue
            if request.num_output_placeholders:
                break  # preempted while a token was in flight: resume once it is back
            hit_blocks, num_hit = kv.get_computed_blocks(request)
            num_new = min(request.num_tokens - num_hit, budget)
            if kv.allocate_slots(request, num_new, hit_blocks, self.num_lookahead_tokens) is None:
                break  # stays waiting; nothing behind it may overtake it
            self.waiting.popleft()
            self.running.append(request)
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_hit
            if request.scheduled_time is None:
                request.scheduled_time = time.monotonic()
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit
            num_scheduled[request.request_id] = num_new
            budget -= num_new
            new_reqs.append(NewRequestData(request.request_id, request.prompt_token_ids,
                                           list(request.output_token_ids), request.sampling_params,
                                           kv.get_block_ids(request.request_id), num_hit,
                                           request.min_tokens_blocked))
            self._advance(request, num_new)
        self.waiting.extendleft(reversed(compiling))

        finished = list(self.finished_req_ids)
        self.finished_req_ids = {}
        return SchedulerOutput(new_reqs, cached_reqs, num_scheduled, sum(num_scheduled.values()),
                               spec_tokens, finished)

    def requeue_finished(self, req_ids: list[str]) -> None:
        """Finished ids of a schedule() that was not launched: they go out with the next step instead."""
        if req_ids:
            self.finished_req_ids = {**dict.fromkeys(req_ids), **self.finished_req_ids}

    @staticmethod
    def _advance(request: Request, num_new: int) -> None:
        """Count the scheduled tokens as computed; a step that reaches the end of the request samples a token."""
        request.num_computed_tokens += num_new
        if request.num_computed_tokens >= len(request.all_token_ids) + request.num_output_placeholders:
            request.num_output_placeholders += 1

    # ------------------------------------------------------------------ results
    def update_from_output(self, scheduler_output: SchedulerOutput,
                           model_runner_output: ModelRunnerOutput) -> EngineCoreOutputs:
        """Apply sampled tokens: spec rollback, append, stop checks, prefix caching, free finished requests."""
        kv = self.kv_cache_manager
        index = {req_id: j for j, req_id in enumerate(model_runner_output.req_ids)}
        outputs: list[EngineCoreOutput] = []
        for req_id in scheduler_output.num_scheduled_tokens:
            request = self.requests.get(req_id)
            if request is None or request.status >= FINISHED:
                continue  # aborted (or finished one step earlier: an async extra step) after it was scheduled
            j = index.get(req_id)
            sampled = model_runner_output.sampled_token_ids[j] if j is not None else []
            if sampled and request.num_output_placeholders > 0:
                request.num_output_placeholders -= 1
            spec = scheduler_output.scheduled_spec_decode_tokens.get(req_id)
            num_drafts = num_accepted = 0
            if spec and sampled:
                if len(sampled) > len(spec) + 1:
                    raise ValueError(f"request {req_id!r}: {len(sampled)} tokens back for {len(spec)} spec tokens")
                request.num_computed_tokens -= len(spec) + 1 - len(sampled)  # the rejected drafts' slots
                num_drafts, num_accepted = len(spec), len(sampled) - 1
                self._count_verification(num_drafts, num_accepted)
            if not sampled:  # partial prefill chunk
                kv.cache_blocks(request, request.num_computed_tokens)
                continue
            was_running = request.status == RequestStatus.RUNNING  # else preempted while its token was in flight
            new_tokens = self._append_and_check_stop(request, sampled)
            if request.first_token_time is None and new_tokens:
                request.first_token_time = time.monotonic()
            kv.cache_blocks(request, request.num_computed_tokens)
            logprobs = None
            if j is not None and model_runner_output.logprobs and model_runner_output.logprobs[j] is not None:
                logprobs = model_runner_output.logprobs[j][:len(new_tokens)]
            finish_reason = timings = None
            if request.status >= FINISHED:
                (self.running if was_running else self.waiting).remove(request)
                self._free_request(request)
                finish_reason = request.finish_reason
                timings = request.timings()
            outputs.append(EngineCoreOutput(req_id, new_tokens, logprobs, finish_reason, request.stop_reason,
                                            request.num_cached_tokens if request.num_cached_tokens > 0 else 0,
                                            num_drafts, num_accepted,
                                            prompt_logprobs=(model_runner_output.prompt_logprobs or {}).get(req_id),
                                            timings=timings))
        return EngineCoreOutputs(outputs=outputs, scheduler_stats=self.make_stats())

    def _count_verification(self, num_drafts: int, num_accepted: int) -> None:
        """Spec-decode counters of one request's verification (its first `num_accepted` drafts were accepted)."""
        self.num_drafts += 1
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += num_accepted
        hist = self._accepted_hist
        if len(hist) <= num_drafts:
            hist.extend([0] * (num_drafts + 1 - len(hist)))
        hist[num_accepted] += 1

    @property
    def num_accepted_per_pos(self) -> list[int]:
        """Accepted drafts by position: entry i counts verifications that accepted more than i drafts."""
        return list(itertools.accumulate(reversed(self._accepted_hist[1:])))[::-1]

    def _append_and_check_stop(self, request: Request, sampled: list[int]) -> list[int]:
        """Append tokens up to the first stop; vLLM's order: length, then (past min_tokens) EOS and stop ids."""
        params = request.sampling_params
        stop_ids = request.stop_token_ids
        eos = request.eos_token_id
        n_out0, n_tok0 = len(request.output_token_ids), len(request.all_token_ids)
        n = len(sampled)
        for k, tok in enumerate(sampled):
            n_out = n_out0 + k + 1
            if n_out >= request.max_tokens or n_tok0 + k + 1 >= self.max_model_len:
                request.status = RequestStatus.FINISHED_LENGTH
            elif n_out >= params.min_tokens:
                if tok == eos:
                    request.status = RequestStatus.FINISHED_STOPPED
                elif stop_ids and tok in stop_ids:
                    request.status = RequestStatus.FINISHED_STOPPED
                    request.stop_reason = tok
            if request.status >= FINISHED:
                n = k + 1
                break
        new_tokens = sampled if n == len(sampled) else sampled[:n]
        grammar = request.grammar
        if grammar is not None and new_tokens:
            taken = grammar.accept_tokens(new_tokens)
            if grammar.is_terminated or taken < len(new_tokens):
                new_tokens = self._end_by_grammar(request, new_tokens, taken)
        request.append_output_token_ids(new_tokens)
        self.kv_cache_manager.update_block_hashes(request)
        return new_tokens

    @staticmethod
    def _end_by_grammar(request: Request, new_tokens: list[int], taken: int) -> list[int]:
        """The request's grammar took `taken` of its new tokens and terminated or refused the next: a terminated
        grammar (its stop token taken) stops the request there with "stop"; a token the grammar refuses (only if the
        mask was not applied) ends it with "error" before that token."""
        if request.grammar.is_terminated:
            if taken < len(new_tokens) or request.status < FINISHED:
                request.status = RequestStatus.FINISHED_STOPPED
                last = new_tokens[taken - 1]
                request.stop_reason = last if last in request.stop_token_ids else None
        else:
            request.status = RequestStatus.FINISHED_ERROR
            request.stop_reason = f"token {new_tokens[taken]} was sampled although the request's grammar forbids it"
        return new_tokens if taken == len(new_tokens) else new_tokens[:taken]

    # ------------------------------------------------------------------ introspection
    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def only_waiting_on_outputs(self) -> bool:
        """Every running request speculates and waits for a step in flight, and none waits for admission: the next
        schedule() would be empty."""
        return (self.speculative and not self.waiting
                and all(r.num_output_placeholders and r.spec_wait for r in self.running))

    def get_num_unfinished_requests(self) -> int:
        return len(self.waiting) + len(self.running)

    def make_stats(self) -> SchedulerStats:
        """Snapshot; prefix-cache queries/hits (tokens) and preemptions are cumulative counters."""
        kv = self.kv_cache_manager
        return SchedulerStats(num_running_reqs=len(self.running), num_waiting_reqs=len(self.waiting),
                              kv_cache_usage=kv.usage, prefix_cache_queries=kv.prefix_cache_queries,
                              prefix_cache_hits=kv.prefix_cache_hits, num_preemptions=self.num_preemptions,
                              num_draft_tokens=self.num_draft_tokens,
                              num_accepted_tokens=self.num_accepted_tokens, num_drafts=self.num_drafts,
                              num_accepted_tokens_per_pos=self.num_accepted_per_pos)

    def reset_prefix_cache(self) -> bool:
        return self.kv_cache_manager.reset_prefix_cache()
