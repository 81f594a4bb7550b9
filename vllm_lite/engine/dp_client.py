"""Data parallelism behind one API server: M independent engine-core replicas (each with its own workers) driven
through one client that looks to the server like a single AsyncEngineClient.

Each new request goes to the replica with the fewest outstanding tokens (prompt + the max_tokens still to come of
its in-flight requests; ties go to the lowest index), so long generations do not pile up on one replica. Aborts go
to the replica that owns the request; outputs come back through that replica's own stream. The first replica loads
the tokenizer and the others share it. Stats are summed over the replicas (KV-cache usage averaged). A replica's
death fails the open requests of every replica and marks the whole server unhealthy, as one engine's death does.
With data_parallel_size 1 the server uses AsyncEngineClient directly: no extra hop.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from typing import Any, AsyncIterator, Callable

from vllm_lite.config import EngineConfig
from vllm_lite.engine.async_client import AsyncEngineClient, EngineDeadError
from vllm_lite.engine.core_launch import EngineCoreProcess
from vllm_lite.engine.output_processor import RequestState
from vllm_lite.protocol import ModelDescription, SchedulerStats
from vllm_lite.sampling_params import SamplingParams

logger = logging.getLogger("vllm_lite.dp_client")


def replica_config(config: EngineConfig, index: int) -> EngineConfig:
    """The config replica `index` is spawned with (its data_parallel_rank sets its devices)."""
    return dataclasses.replace(config, parallel=dataclasses.replace(config.parallel, data_parallel_rank=index))


def sum_stats(stats: list[SchedulerStats]) -> SchedulerStats:
    """Counters and gauges summed over replicas (per-position lists element-wise); KV-cache usage averaged."""
    total: dict[str, Any] = {}
    for name in SchedulerStats.__struct_fields__:
        values = [getattr(s, name) for s in stats]
        if name == "kv_cache_usage":
            total[name] = sum(values) / len(values)
        elif isinstance(values[0], list):
            width = max(len(v) for v in values)
            total[name] = [sum(v[i] for v in values if i < len(v)) for i in range(width)]
        else:
            total[name] = sum(values)
    return SchedulerStats(**total)


class DataParallelClient:
    def __init__(self, config: EngineConfig, core: EngineCoreProcess | None = None,
                 tokenizer_loader: Callable[[ModelDescription], Any] | None = None) -> None:
        """core: replica 0's engine core if spawned early (the CLI does); the others are spawned by `start`."""
        self.config = config
        n = config.parallel.data_parallel_size
        self.replicas = [AsyncEngineClient(replica_config(config, i), core=core if i == 0 else None,
                                           tokenizer_loader=tokenizer_loader if i == 0 else None) for i in range(n)]
        self.output_listeners: list[Any] = []  # shared by every replica: metrics see all outputs
        self.on_dead: Any = None
        self.dead_reason: str | None = None
        self.outstanding_tokens = [0] * n  # routing load: prompt + max_tokens still to come, per replica
        self.num_routed = [0] * n  # requests sent to each replica since start (exposed in /metrics)
        self._owner: dict[str, int] = {}
        for i, replica in enumerate(self.replicas):
            replica.output_listeners = self.output_listeners
            replica.on_dead = functools.partial(self._replica_died, i)

    # ---- what the server reads ---------------------------------------------------------------------------------
    @property
    def info(self) -> ModelDescription | None:
        return self.replicas[0].info

    @property
    def tokenizer(self) -> Any:
        return self.replicas[0].tokenizer

    @property
    def num_blocks(self) -> int:
        """KV blocks over all replicas."""
        return sum(r.num_blocks for r in self.replicas)

    @property
    def stats(self) -> SchedulerStats:
        return sum_stats([r.stats for r in self.replicas])

    @property
    def is_healthy(self) -> bool:
        return self.dead_reason is None and all(r.is_healthy for r in self.replicas)

    @property
    def stopping(self) -> str | None:
        return self.replicas[0].stopping

    @property
    def num_in_flight(self) -> int:
        return sum(r.num_in_flight for r in self.replicas)

    # ---- life cycle --------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start every replica at once; the first failure (or a cancel: Ctrl-C during start-up) cancels the
        others' start-up, so no start-up task outlives it (shutdown then stops every engine core)."""
        tasks = [asyncio.ensure_future(r.start()) for r in self.replicas]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()
        for replica in self.replicas[1:]:
            replica.use_tokenizer(self.tokenizer)
        logger.info("%d data-parallel replicas ready (%s KV blocks)", len(self.replicas),
                    " + ".join(str(r.num_blocks) for r in self.replicas))

    def shutdown(self) -> None:
        """Stop every replica's engine core (each stops its workers); no process is left behind."""
        for replica in self.replicas:
            replica.shutdown()

    def _replica_died(self, index: int) -> None:
        if self.dead_reason is not None:
            return
        self.dead_reason = f"data-parallel replica {index}: {self.replicas[index].dead_reason}"
        for replica in self.replicas:  # the server goes down: every replica's open requests fail now
            replica.mark_dead(self.dead_reason)
        if self.on_dead is not None:
            self.on_dead()

    # ---- requests ----------------------------------------------------------------------------------------------
    def _route(self) -> int:
        """The replica with the fewest outstanding tokens (min keeps the lowest index on ties)."""
        return min(range(len(self.replicas)), key=self.outstanding_tokens.__getitem__)

    async def generate(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestState]:
        """AsyncEngineClient.generate on the least-loaded replica, keeping its outstanding-token count current."""
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        index = self._route()
        max_tokens = params.max_tokens
        if max_tokens is None:
            max_tokens = max(int(self.info.max_model_len) - len(prompt_token_ids), 0)
        budget = max_tokens * params.n
        left = len(prompt_token_ids) + budget
        self.outstanding_tokens[index] += left
        self.num_routed[index] += 1
        self._owner[request_id] = index
        gen = self.replicas[index].generate(request_id, prompt, prompt_token_ids, params)
        try:
            async for state in gen:
                now_left = len(prompt_token_ids) + max(budget - sum(len(s.token_ids) for s in state.sequences), 0)
                self.outstanding_tokens[index] -= left - now_left
                left = now_left
                yield state
        finally:
            self.outstanding_tokens[index] -= left
            self._owner.pop(request_id, None)
            await gen.aclose()

    async def abort(self, request_id: str) -> None:
        index = self._owner.get(request_id)
        if index is not None:
            await self.replicas[index].abort(request_id)

    async def abort_all(self, reason: str) -> None:
        await asyncio.gather(*(r.abort_all(reason) for r in self.replicas))
