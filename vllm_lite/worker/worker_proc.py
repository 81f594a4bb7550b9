"""Worker processes and the executor the engine core uses to drive them over ZeroMQ.

A worker needs nothing but the EngineConfig to boot: it resolves the model itself, so its imports, model load
and compile start at spawn and never wait for another process.

The executor waits for replies while watching each worker's process sentinel, so a dead worker surfaces as an
error in the engine core within a fraction of a second instead of a hang.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
from typing import TYPE_CHECKING, Any

import zmq

from vllm_lite.config import EngineConfig
from vllm_lite.core.sched_output import ModelRunnerOutput, SchedulerOutput
from vllm_lite.engine.ipc import (WORKER_EVENT_DECODER, WORKER_INPUT_DECODER, ModelDescription, ModelError,
                                  WorkerCall, WorkerReply, describe_model, die_with_parent, encode, ipc_address)
from vllm_lite.gc_utils import freeze_startup_heap
from vllm_lite.logging_utils import setup_logging

if TYPE_CHECKING:
    from vllm_lite.worker.worker import Worker

logger = logging.getLogger("vllm_lite.worker")

_POLL_MS = 200


class WorkerDiedError(RuntimeError):
    pass


def run_worker(config: EngineConfig, rank: int, in_addr: str, out_addr: str,
               spawned_at: float | None = None) -> None:
    """Worker process main. It boots on its own from the config, at once: resolve the model (its description is
    the first message; the engine core passes it on to the API server), load it, size the KV cache (the profiling
    forward compiles the model), then say "ready" and serve calls and steps until told to stop."""
    die_with_parent()
    setup_logging()
    if spawned_at is not None:
        logger.info("worker %d process up %.2f s after spawn", rank, time.time() - spawned_at)
    ctx = zmq.Context()
    inbox = ctx.socket(zmq.PULL)
    inbox.connect(in_addr)
    outbox = ctx.socket(zmq.PUSH)
    outbox.connect(out_addr)
    parent = os.getppid()
    try:
        booted = _boot(config, rank, outbox)
        if booted is None:
            return
        worker, early = booted
        outbox.send(encode(WorkerReply(result="ready")))
        while True:
            if not inbox.poll(1000):
                if os.getppid() != parent:
                    return
                continue
            msg = WORKER_INPUT_DECODER.decode(inbox.recv())
            if isinstance(msg, SchedulerOutput):
                # Launch only. The engine core asks for outputs with "get_output"; with async scheduling that
                # request arrives after the next step, which is then already running while this one is answered.
                worker.execute_model(msg)
            elif msg.method == "get_output":
                outbox.send(encode(worker.get_output()))
            elif msg.method == "shutdown":
                outbox.send(encode(WorkerReply(result="bye")))
                return
            elif msg.method in early:
                outbox.send(encode(WorkerReply(result=early.pop(msg.method))))
            else:
                try:
                    outbox.send(encode(WorkerReply(result=getattr(worker, msg.method)(*msg.args))))
                except Exception as e:  # a failed control call is reported, the engine core decides
                    outbox.send(encode(WorkerReply(error=f"{type(e).__name__}: {e}")))
                else:
                    if msg.method == "initialize_kv_cache":  # KV cache and CUDA graphs exist: start-up is done
                        freeze_startup_heap()
    except Exception as e:
        logger.exception("worker %d failed", rank)
        outbox.send(encode(WorkerReply(error=f"{type(e).__name__}: {e}")))
    finally:
        ctx.destroy(linger=1000)


def _boot(config: EngineConfig, rank: int, outbox: zmq.Socket) -> tuple[Worker, dict[str, Any]] | None:
    """Resolve the model and send its description (or, returning None, what is wrong with it: the API server
    prints that as one line), then load the model and size the KV cache. Returns the worker and the answers to
    calls made early (the profiling run happens before the engine core asks, overlapping its own imports)."""
    start = time.perf_counter()
    try:
        from vllm_lite.model_loader import resolve_model
        imported = time.perf_counter()
        info = resolve_model(config.model, config.load, config.device.resolved_device())
    except Exception as e:  # noqa: BLE001 - any resolution failure is about the model (bad path, config, ...)
        logger.debug("worker %d: model resolution failed", rank, exc_info=True)
        outbox.send(encode(ModelError(f"{type(e).__name__}: {e}")))
        return None
    outbox.send(encode(describe_model(info)))
    logger.info("worker %d: model %r -> %s resolved in %.2f s (+ %.2f s of imports)", rank, config.model.model,
                info.path, time.perf_counter() - imported, imported - start)
    start = time.perf_counter()
    from vllm_lite.worker.worker import Worker
    logger.info("worker %d imports done in %.2f s", rank, time.perf_counter() - start)
    worker = Worker(config, info, rank)
    worker.load_model()
    return worker, {"determine_num_blocks": worker.determine_num_blocks()}


class MultiprocExecutor:
    """Spawns one worker process per device and exchanges msgspec messages with it."""

    def __init__(self, config: EngineConfig, sock_dir: str) -> None:
        """Spawns the worker and returns at once (it boots meanwhile); `wait_model_description` must come first,
        then the first call waits for the worker to be ready (model loaded, KV cache size known)."""
        self.ctx = zmq.Context()
        self.to_worker = self.ctx.socket(zmq.PUSH)
        in_addr = ipc_address(sock_dir, "worker0-in")
        out_addr = ipc_address(sock_dir, "worker0-out")
        self.to_worker.bind(in_addr)
        self.from_worker = self.ctx.socket(zmq.PULL)
        self.from_worker.bind(out_addr)
        self.proc = mp.get_context("spawn").Process(target=run_worker, name="vllm-lite-worker-0",
                                                    args=(config, 0, in_addr, out_addr, time.time()))
        self.proc.start()
        self._ready = False  # "ready" once the model is loaded

    def wait_model_description(self) -> tuple[ModelDescription | ModelError, bytes]:
        """The worker's first message, decoded and as received (to pass on unchanged): the resolved model, or what
        is wrong with it. Raises WorkerDiedError if the worker exits first."""
        frame = self._recv_frame()
        msg = WORKER_EVENT_DECODER.decode(frame)
        if isinstance(msg, WorkerReply):
            raise RuntimeError(f"worker error: {msg.error}")
        if not isinstance(msg, (ModelDescription, ModelError)):
            raise RuntimeError(f"unexpected first message from worker: {type(msg).__name__}")
        return msg, frame

    def _recv_frame(self) -> bytes:
        while not self.from_worker.poll(_POLL_MS):
            if not self.proc.is_alive():
                raise WorkerDiedError(f"worker process exited with code {self.proc.exitcode}")
        return self.from_worker.recv()

    def _recv(self) -> Any:
        return WORKER_EVENT_DECODER.decode(self._recv_frame())

    def _wait_reply(self) -> Any:
        reply = self._recv()
        if not isinstance(reply, WorkerReply):
            raise RuntimeError(f"unexpected message from worker: {type(reply).__name__}")
        if reply.error is not None:
            raise RuntimeError(f"worker error: {reply.error}")
        return reply.result

    def _call(self, method: str, *args: Any) -> Any:
        if not self._ready:  # "ready" once the model is loaded
            self._wait_reply()
            self._ready = True
        self.to_worker.send(encode(WorkerCall(method, list(args))))
        return self._wait_reply()

    def determine_num_blocks(self) -> int:
        return int(self._call("determine_num_blocks"))

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self._call("initialize_kv_cache", num_blocks)

    def execute_model(self, scheduler_output: SchedulerOutput) -> None:
        """Send a step to launch; nothing comes back until `get_output` asks."""
        self.to_worker.send(encode(scheduler_output))

    def get_output(self) -> ModelRunnerOutput:
        """The oldest launched step's output (the worker answers in launch order)."""
        self.to_worker.send(encode(WorkerCall("get_output")))
        out = self._recv()
        if isinstance(out, WorkerReply):
            raise RuntimeError(f"worker error: {out.error}")
        return out

    def shutdown(self) -> None:
        """Ask a worker that is serving to stop; one still booting reads no messages, so it is terminated."""
        if self.proc.is_alive() and self._ready:
            try:
                self.to_worker.send(encode(WorkerCall("shutdown")), flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            self.proc.join(5)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.ctx.destroy(linger=0)
