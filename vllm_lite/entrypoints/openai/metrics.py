"""Prometheus metrics (vLLM names, `vllm:` prefix) on a private CollectorRegistry.

Scheduler gauges and the prefix-cache counters are read from `client.stats` (a SchedulerStats; its
prefix_cache_queries/hits are cumulative; summed over the replicas with -dp > 1, which also adds per-replica series
labelled `engine`) at scrape time; token counters and latency histograms are fed by the
serving code and by `client.output_listeners`.
"""
from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0, 160.0]
_TPOT_BUCKETS = [0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                 10.0, 20.0, 40.0, 80.0]
_E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0, 1920.0, 7680.0]


class _SchedulerCollector:
    """Gauges and cumulative counters straight from the client's latest SchedulerStats."""

    def __init__(self, client: Any, model_name: str) -> None:
        self.client = client
        self.model_name = model_name

    def collect(self):
        stats = self.client.stats
        labels = [self.model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric(labels, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric(labels, value)
            return c

        usage = float(stats.kv_cache_usage)
        yield gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
                    stats.num_running_reqs)
        yield gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                    stats.num_waiting_reqs)
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", usage)
        yield gauge("vllm:gpu_cache_usage_perc", "KV-cache usage (old name). 1 means 100 percent usage.", usage)
        yield counter("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
                      stats.prefix_cache_queries)
        yield counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
                      stats.prefix_cache_hits)
        q = stats.prefix_cache_queries
        yield gauge("vllm:prefix_cache_hit_rate", "Prefix cache hit rate since start (hits / queries).",
                    stats.prefix_cache_hits / q if q else 0.0)
        yield counter("vllm:num_preemptions", "Cumulative number of preemptions.", stats.num_preemptions)
        yield from _spec_decode_counters(stats, self.model_name, counter)
        yield gauge("vllm:engine_healthy", "1 while the engine core is alive.", 1.0 if self.client.is_healthy else 0.0)
        if getattr(self.client, "replicas", None):
            yield from _replica_metrics(self.client, self.model_name)


def _replica_metrics(client: Any, model_name: str):
    """With -dp > 1 (a DataParallelClient): per-replica series, label `engine` = the replica index, beside the
    totals above: requests routed to it, its outstanding tokens (the routing load) and its running requests."""
    labels = ["model_name", "engine"]
    routed = CounterMetricFamily("vllm:engine_requests_routed", "Requests routed to this data-parallel replica.",
                                 labels=labels)
    load = GaugeMetricFamily("vllm:engine_outstanding_tokens", "Prompt + max_tokens still to come of the "
                             "replica's in-flight requests (what routing balances).", labels=labels)
    running = GaugeMetricFamily("vllm:engine_num_requests_running", "Requests in the replica's batches.",
                                labels=labels)
    for i, replica in enumerate(client.replicas):
        routed.add_metric([model_name, str(i)], client.num_routed[i])
        load.add_metric([model_name, str(i)], client.outstanding_tokens[i])
        running.add_metric([model_name, str(i)], replica.stats.num_running_reqs)
    yield routed
    yield load
    yield running


def _spec_decode_counters(stats: Any, model_name: str, counter: Any):
    """vLLM's speculative-decoding counters (cumulative; zero without speculation): verifications, draft tokens,
    accepted tokens, and accepted tokens per draft position (label `position`, 0 = the first draft of a step)."""
    yield counter("vllm:spec_decode_num_drafts", "Number of spec decoding drafts (verification steps).",
                  stats.num_drafts)
    yield counter("vllm:spec_decode_num_draft_tokens", "Number of draft tokens.", stats.num_draft_tokens)
    yield counter("vllm:spec_decode_num_accepted_tokens", "Number of accepted tokens.", stats.num_accepted_tokens)
    per_pos = CounterMetricFamily("vllm:spec_decode_num_accepted_tokens_per_pos",
                                  "Accepted tokens per draft position.", labels=["model_name", "position"])
    for pos, n in enumerate(stats.num_accepted_tokens_per_pos):
        per_pos.add_metric([model_name, str(pos)], n)
    yield per_pos


class ServerMetrics:
    def __init__(self, client: Any, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        lab = ["model_name"]
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", lab,
                                     registry=self.registry).labels(model_name)
        self.generation_tokens = Counter("vllm:generation_tokens", "Number of generation tokens processed.", lab,
                                         registry=self.registry).labels(model_name)
        self._success = Counter("vllm:request_success", "Count of successfully finished requests.",
                                ["model_name", "finished_reason"], registry=self.registry)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              lab, buckets=_TTFT_BUCKETS, registry=self.registry).labels(model_name)
        self.tpot = Histogram("vllm:time_per_output_token_seconds",
                              "Histogram of time per output token in seconds.", lab, buckets=_TPOT_BUCKETS,
                              registry=self.registry).labels(model_name)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of end-to-end request latency.", lab,
                             buckets=_E2E_BUCKETS, registry=self.registry).labels(model_name)
        self.prompt_len = Histogram("vllm:request_prompt_tokens", "Number of prefill tokens per request.", lab,
                                    buckets=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000],
                                    registry=self.registry).labels(model_name)
        self.gen_len = Histogram("vllm:request_generation_tokens", "Number of generation tokens per request.",
                                 lab, buckets=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000],
                                 registry=self.registry).labels(model_name)
        # vLLM's request-level phases, from the engine core's own clock (sent with each request's last output)
        self.phases = [Histogram(f"vllm:request_{name}_time_seconds", doc, lab, buckets=_E2E_BUCKETS,
                                 registry=self.registry).labels(model_name) for name, doc in (
            ("queue", "Histogram of time spent in WAITING phase for request."),
            ("prefill", "Histogram of time spent in PREFILL phase for request."),
            ("decode", "Histogram of time spent in DECODE phase for request."),
            ("inference", "Histogram of time spent in RUNNING phase for request."))]
        self.registry.register(_SchedulerCollector(client, model_name))
        listeners = getattr(client, "output_listeners", None)
        if listeners is not None:
            listeners.append(self.on_engine_outputs)

    def on_engine_outputs(self, outputs: Any) -> None:
        n = 0
        for o in outputs.outputs:
            n += len(o.new_token_ids)
            if o.timings is not None:
                self._observe_phases(*o.timings)
        if n:
            self.generation_tokens.inc(n)

    def _observe_phases(self, queued: float | None, scheduled: float | None, first: float | None,
                        finished: float) -> None:
        """Queue = queued -> first scheduled, prefill = scheduled -> first token, decode = first -> last token,
        inference = scheduled -> finished (vLLM's definitions); phases a request never reached are not observed."""
        queue, prefill, decode, inference = self.phases
        if queued is not None and scheduled is not None:
            queue.observe(max(scheduled - queued, 0.0))
        if scheduled is not None:
            inference.observe(max(finished - scheduled, 0.0))
            if first is not None:
                prefill.observe(max(first - scheduled, 0.0))
        if first is not None:
            decode.observe(max(finished - first, 0.0))

    def on_request_start(self, num_prompt_tokens: int) -> None:
        self.prompt_tokens.inc(num_prompt_tokens)
        self.prompt_len.observe(num_prompt_tokens)

    def on_request_finished(self, state: Any) -> None:
        """Latency histograms from a finished RequestState (arrival/first-token times are wall-clock)."""
        now = time.time()
        e2e = now - state.arrival_time
        self.e2e.observe(e2e)
        num_out = max((len(s.token_ids) for s in state.sequences), default=0)
        self.gen_len.observe(sum(len(s.token_ids) for s in state.sequences))
        if state.first_token_time is not None:
            ttft = state.first_token_time - state.arrival_time
            self.ttft.observe(max(ttft, 0.0))
            if num_out > 1:
                self.tpot.observe(max(now - state.first_token_time, 0.0) / (num_out - 1))
        for s in state.sequences:
            if s.finish_reason in ("stop", "length"):
                self._success.labels(self.model_name, s.finish_reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
