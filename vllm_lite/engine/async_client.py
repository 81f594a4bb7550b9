"""The API server's handle on the engine core process: submit requests, stream their state, abort, watch health.

It owns the OutputProcessor (detokenization, stop strings, n-fan-out) so the engine core only sees token ids.
A background task reads EngineCoreOutputs from the core's socket and wakes the waiting request streams; another
watches the core process and fails every open request within a second of its death.
"""
from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import pickle
from typing import Any, AsyncIterator

import zmq
import zmq.asyncio

from vllm_lite.config import EngineConfig
from vllm_lite.engine.core_launch import EngineCoreProcess, spawn_engine_core
from vllm_lite.engine.ipc import CORE_EVENT_DECODER, AbortRequests, EngineDead, EngineReady, encode
from vllm_lite.engine.messages import EngineCoreOutputs, SchedulerStats
from vllm_lite.engine.output_processor import OutputProcessor, RequestState
from vllm_lite.model_loader import ModelInfo
from vllm_lite.sampling_params import SamplingParams

logger = logging.getLogger("vllm_lite.async_client")


class EngineDeadError(RuntimeError):
    """The engine core (or a worker) is gone; no request can complete."""


class AsyncEngineClient:
    def __init__(self, config: EngineConfig, info: ModelInfo, tokenizer: Any,
                 core: EngineCoreProcess | None = None) -> None:
        """core: an engine core spawned early (`spawn_engine_core`); `start` spawns one when None."""
        self.config = config
        self.info = info
        self.tokenizer = tokenizer
        eos = list(info.eos_token_ids)
        primary = tokenizer.eos_token_id if tokenizer is not None and tokenizer.eos_token_id is not None \
            else (eos[0] if eos else None)
        self.processor = OutputProcessor(tokenizer, [e for e in eos if e != primary], primary)
        self.stats = SchedulerStats()
        self.num_blocks = 0
        self.dead_reason: str | None = None
        self._events: dict[str, asyncio.Event] = {}
        self._tasks: list[asyncio.Task] = []
        self._core = core
        self._ctx = zmq.asyncio.Context()
        self.on_dead: Any = None  # callback run once when the engine dies (the server uses it to exit)
        self.output_listeners: list[Any] = []  # callables fed every EngineCoreOutputs (metrics)

    @property
    def _proc(self) -> mp.process.BaseProcess | None:
        return self._core.proc if self._core is not None else None

    @property
    def is_healthy(self) -> bool:
        return self.dead_reason is None and self._proc is not None and self._proc.is_alive()

    async def start(self) -> None:
        """Spawn the engine core (unless spawned early), send it the model description, wait until it is ready."""
        if self._core is None:
            self._core = spawn_engine_core(self.config)
        self._input = self._ctx.socket(zmq.PUSH)
        self._input.bind(self._core.in_addr)
        self._output = self._ctx.socket(zmq.PULL)
        self._output.bind(self._core.out_addr)
        # ModelInfo travels pickled, as the first frame: the engine core unpickles it (torch, transformers) after
        # spawning its worker. A PUSH socket blocks until its peer connects, so poll (the peer may have died).
        blob = pickle.dumps(self.info)
        while True:
            try:
                await self._input.send(blob, flags=zmq.NOBLOCK)
                break
            except zmq.Again:
                if not self._proc.is_alive():
                    raise EngineDeadError(f"engine core exited during startup (exit code {self._proc.exitcode})")
                await asyncio.sleep(0.01)
        while True:
            if await self._output.poll(500) and (msg := CORE_EVENT_DECODER.decode(await self._output.recv())):
                if isinstance(msg, EngineReady):
                    self.num_blocks = msg.num_blocks
                    break
                if isinstance(msg, EngineDead):
                    raise EngineDeadError(f"engine core failed to start: {msg.reason}")
            if not self._proc.is_alive():
                raise EngineDeadError(f"engine core exited during startup (exit code {self._proc.exitcode})")
        self._tasks = [asyncio.create_task(self._output_loop()), asyncio.create_task(self._watch_core())]

    async def _output_loop(self) -> None:
        while True:
            msg = CORE_EVENT_DECODER.decode(await self._output.recv())
            if isinstance(msg, EngineDead):
                self._mark_dead(msg.reason)
                return
            if not isinstance(msg, EngineCoreOutputs):
                continue
            if msg.scheduler_stats is not None:
                self.stats = msg.scheduler_stats
            for listener in self.output_listeners:
                listener(msg)
            changed, to_abort = self.processor.process_outputs(msg.outputs)
            if to_abort:
                await self._input.send(encode(AbortRequests(to_abort)))
            for state in changed:
                event = self._events.get(state.request_id)
                if event is not None:
                    event.set()

    async def _watch_core(self) -> None:
        while self._proc.is_alive():
            await asyncio.sleep(0.25)
        self._mark_dead(f"engine core process exited with code {self._proc.exitcode}")

    def _mark_dead(self, reason: str) -> None:
        if self.dead_reason is not None:
            return
        self.dead_reason = reason
        logger.error("engine is dead: %s", reason)
        for event in self._events.values():
            event.set()
        if self.on_dead is not None:
            self.on_dead()

    async def generate(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestState]:
        """Yield the request's state after each engine update until all its sequences finish.

        Consumers read per-sequence deltas themselves (token_ids / logprobs past what they already sent, and
        `seq.detokenizer.get_delta(finished)` for text). Cancelling the consumer (client disconnect) aborts.
        """
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        event = asyncio.Event()
        self._events[request_id] = event
        finished = False
        try:
            for req in self.processor.add_request(request_id, prompt, prompt_token_ids, params):
                await self._input.send(encode(req))
            state = self.processor.requests[request_id]
            while True:
                await event.wait()
                event.clear()
                if self.dead_reason is not None:
                    raise EngineDeadError(self.dead_reason)
                finished = state.finished
                yield state
                if finished:
                    return
        finally:
            self._events.pop(request_id, None)
            if not finished:
                await self.abort(request_id)

    async def abort(self, request_id: str) -> None:
        ids = self.processor.abort_request(request_id)
        if ids and self.dead_reason is None:
            await self._input.send(encode(AbortRequests(ids)))

    def shutdown(self) -> None:
        """Stop the engine core (it stops its workers) and wait for it; no process is left behind."""
        for task in self._tasks:
            task.cancel()
        if self._core is not None:
            self._core.stop()
        self._ctx.destroy(linger=0)

