"""The API server's handle on the engine core process: submit requests, stream their state, abort, watch health.

It owns the OutputProcessor (detokenization, stop strings, n-fan-out) so the engine core only sees token ids.
An event-loop reader callback on the core's output socket takes EngineCoreOutputs and wakes the waiting request
streams; a background task watches the core process and fails every open request within a second of its death.

Start-up: the worker resolves the model; its description (`info`) is the first message from the engine core. The
tokenizer then loads in a thread while the engine loads the model. No torch or transformers import here.
"""
from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import threading
import time
from typing import Any, AsyncIterator, Callable

import zmq
import zmq.asyncio

from vllm_lite.config import EngineConfig
from vllm_lite.engine.core_launch import EngineCoreProcess, spawn_engine_core
from vllm_lite.engine.output_processor import OutputProcessor, RequestState
from vllm_lite.protocol import (CORE_EVENT_DECODER, AbortRequests, EngineCoreOutputs, EngineDead, EngineReady,
                                ModelDescription, ModelError, SchedulerStats, encode)
from vllm_lite.sampling_params import SamplingParams

logger = logging.getLogger("vllm_lite.async_client")


class EngineDeadError(RuntimeError):
    """The engine core (or a worker) is gone; no request can complete."""


class ServerStoppingError(EngineDeadError):
    """The server is shutting down (abort_all ran): a request not yet in the engine is refused (a 503)."""


class EngineStartupError(EngineDeadError):
    """The engine did not start (the model cannot be served, a process died); the message says it all."""


class AsyncEngineClient:
    def __init__(self, config: EngineConfig, core: EngineCoreProcess | None = None,
                 tokenizer_loader: Callable[[ModelDescription], Any] | None = None) -> None:
        """core: an engine core spawned early (`spawn_engine_core`); `start` spawns one when None.
        tokenizer_loader: builds the tokenizer from the model description (None: no tokenizer). `info`, `tokenizer`
        and `num_blocks` are set by `start`."""
        self.config = config
        self.info: ModelDescription | None = None
        self.tokenizer: Any = None
        self._tokenizer_loader = tokenizer_loader
        self.processor: OutputProcessor | None = None
        self.stats = SchedulerStats()
        self.num_blocks = 0
        self.dead_reason: str | None = None
        self._events: dict[str, asyncio.Event] = {}
        self._tasks: list[asyncio.Task] = []
        self._core = core
        self._ctx = zmq.asyncio.Context()
        self.on_dead: Any = None  # callback run once when the engine dies (the server uses it to exit)
        self.output_listeners: list[Any] = []  # callables fed every EngineCoreOutputs (metrics)
        self.stopping: str | None = None  # set by abort_all (server shutdown): new requests are refused
        self._closed = False

    @property
    def _proc(self) -> mp.process.BaseProcess | None:
        return self._core.proc if self._core is not None else None

    @property
    def is_healthy(self) -> bool:
        return self.dead_reason is None and self._proc is not None and self._proc.is_alive()

    async def start(self) -> None:
        """Spawn the engine core (unless spawned early), take the model description, load the tokenizer while the
        engine loads the model, and wait until the engine is ready. Raises EngineStartupError."""
        if self._core is None:
            self._core = spawn_engine_core(self.config)
        self._input = self._ctx.socket(zmq.PUSH)
        self._input.bind(self._core.in_addr)
        self._output = self._ctx.socket(zmq.PULL)
        self._output.bind(self._core.out_addr)
        start = time.perf_counter()
        msg = await self._startup_event()
        if isinstance(msg, ModelError):
            raise EngineStartupError(msg.reason)
        if not isinstance(msg, ModelDescription):
            raise EngineStartupError(f"engine core sent {type(msg).__name__} before the model description")
        self.info = msg
        logger.info("model description from the engine after %.2f s: %r -> %s", time.perf_counter() - start,
                    msg.model, msg.path)
        tokenizer = _in_thread(self._tokenizer_loader, msg) if self._tokenizer_loader is not None else None
        try:
            msg = await self._startup_event()
            if not isinstance(msg, EngineReady):
                raise EngineStartupError(f"engine core sent {type(msg).__name__} before it was ready")
        except BaseException:
            if tokenizer is not None:
                tokenizer.cancel()
            raise
        self.num_blocks = msg.num_blocks
        if tokenizer is not None:
            self.tokenizer = await tokenizer
        self.use_tokenizer(self.tokenizer)
        self._start_output_reader()
        self._tasks = [asyncio.create_task(self._watch_core())]

    def use_tokenizer(self, tokenizer: Any) -> None:
        """Detokenize with `tokenizer` (data-parallel replicas share the one loaded by the first)."""
        self.tokenizer = tokenizer
        self.processor = OutputProcessor(tokenizer)

    async def _startup_event(self) -> Any:
        """The next message from the engine core during start-up; its death or EngineDead is an error."""
        while True:
            if await self._output.poll(500):
                msg = CORE_EVENT_DECODER.decode(await self._output.recv())
                if isinstance(msg, EngineDead):
                    raise EngineStartupError(f"engine core failed to start: {msg.reason}")
                return msg
            if not self._proc.is_alive():
                raise EngineStartupError(f"engine core exited during startup (exit code {self._proc.exitcode})")

    def _start_output_reader(self) -> None:
        """Read the engine core's outputs in an event-loop reader callback on the socket's file descriptor, every
        queued message per wake-up, through a plain (non-asyncio) view of the socket: pyzmq's asyncio receive
        builds futures and checks its loop per message (this cut the API server's CPU per streamed token by ~20 %
        on the 2-core machine, bench/tools/server_cpu.py)."""
        self._output_sync = zmq.Socket.shadow(self._output.underlying)
        self._output_fd = self._output_sync.getsockopt(zmq.FD)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._output_fd, self._drain_outputs)
        self._loop.call_soon(self._drain_outputs)  # the descriptor is edge-triggered: take what is queued already

    def _stop_output_reader(self) -> None:
        if getattr(self, "_output_fd", None) is not None:
            fd, self._output_fd = self._output_fd, None
            try:
                self._loop.remove_reader(fd)
            except RuntimeError:  # the loop is already closed: nothing reads any more
                pass

    def _drain_outputs(self) -> None:
        """Handle every message the engine core has queued (zmq's descriptor only signals new arrivals)."""
        sock = self._output_sync
        while self._output_fd is not None and sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self._handle_output(CORE_EVENT_DECODER.decode(frame))
            except Exception:  # noqa: BLE001 - one bad message must not stop the reader
                logger.exception("engine output could not be handled")

    def _handle_output(self, msg: Any) -> None:
        if isinstance(msg, EngineDead):
            self._stop_output_reader()
            self.mark_dead(msg.reason)
            return
        if not isinstance(msg, EngineCoreOutputs):
            return
        if msg.scheduler_stats is not None:
            self.stats = msg.scheduler_stats
        for listener in self.output_listeners:
            listener(msg)
        changed, to_abort = self.processor.process_outputs(msg.outputs)
        if to_abort and not self._closed:
            self._input.send(encode(AbortRequests(to_abort)))  # a PUSH send: queued at once, nothing to await
        for state in changed:
            event = self._events.get(state.request_id)
            if event is not None:
                event.set()

    async def _watch_core(self) -> None:
        while self._proc.is_alive():
            await asyncio.sleep(0.25)
        self.mark_dead(f"engine core process exited with code {self._proc.exitcode}")

    def mark_dead(self, reason: str) -> None:
        """Fail every open request with `reason` and run on_dead once (also how a data-parallel sibling's death
        ends this replica's requests)."""
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
        if self.stopping is not None:
            raise ServerStoppingError(self.stopping)
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
        if ids and self.dead_reason is None and not self._closed:
            await self._input.send(encode(AbortRequests(ids)))

    @property
    def num_in_flight(self) -> int:
        """Requests whose stream is still open (generate has not returned)."""
        return len(self._events)

    async def abort_all(self, reason: str) -> None:
        """Server shutdown: refuse new requests and end every open one now, as finished with finish_reason
        "abort" and `reason` as its stop_reason (a stream sends its last chunk, then [DONE]); the engine core
        drops them."""
        self.stopping = reason
        ids: list[str] = []
        for request_id, event in list(self._events.items()):
            state = self.processor.requests.get(request_id)
            aborted = self.processor.abort_request(request_id)
            if state is not None:
                for seq in state.sequences:
                    if seq.engine_id in aborted:
                        seq.stop_reason = reason
            ids += aborted
            event.set()
        if ids and self.dead_reason is None and not self._closed:
            await self._input.send(encode(AbortRequests(ids)))

    def shutdown(self) -> None:
        """Stop the engine core (it stops its workers) and wait for it; no process is left behind."""
        self._closed = True  # a stream closed later must not touch the destroyed sockets
        self._stop_output_reader()
        for task in self._tasks:
            task.cancel()
        if self._core is not None:
            self._core.stop()
        self._ctx.destroy(linger=0)


def _in_thread(fn: Callable[..., Any], *args: Any) -> asyncio.Future:
    """Run fn in a daemon thread (an abandoned tokenizer load must not hold up the exit), as an awaitable."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if not future.done():
            future.set_result(result) if error is None else future.set_exception(error)

    def run() -> None:
        result, error = None, None
        try:
            result = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting task
            error = e
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop is gone (start-up failed meanwhile): nobody waits for it
            pass
    threading.Thread(target=run, name="tokenizer-load", daemon=True).start()
    return future
