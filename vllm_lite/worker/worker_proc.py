"""Worker processes and the executor the engine core uses to drive them over ZeroMQ.

The executor waits for replies while watching each worker's process sentinel, so a dead worker surfaces as an
error in the engine core within a fraction of a second instead of a hang.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import pickle
import time
from typing import Any

import zmq

from vllm_lite.config import EngineConfig
from vllm_lite.core.sched_output import ModelRunnerOutput, SchedulerOutput
from vllm_lite.engine.ipc import (WORKER_EVENT_DECODER, WORKER_INPUT_DECODER, WorkerCall, WorkerReply,
                                  die_with_parent, encode, ipc_address, send_first)
from vllm_lite.logging_utils import setup_logging

logger = logging.getLogger("vllm_lite.worker")

_POLL_MS = 200


class WorkerDiedError(RuntimeError):
    pass


def run_worker(config: EngineConfig, rank: int, in_addr: str, out_addr: str,
               spawned_at: float | None = None) -> None:
    """Worker process main: load the model, then serve calls and steps until told to stop. The first frame on
    the input socket is the pickled ModelInfo (the engine core passes it on once the API server has sent it)."""
    die_with_parent()
    setup_logging()
    if spawned_at is not None:
        logger.info("worker %d process up %.2f s after spawn", rank, time.time() - spawned_at)
    start = time.perf_counter()
    from vllm_lite.worker.worker import Worker
    logger.info("worker %d imports done in %.2f s", rank, time.perf_counter() - start)
    ctx = zmq.Context()
    inbox = ctx.socket(zmq.PULL)
    inbox.connect(in_addr)
    outbox = ctx.socket(zmq.PUSH)
    outbox.connect(out_addr)
    parent = os.getppid()
    try:
        info = pickle.loads(inbox.recv())
        worker = Worker(config, info, rank)
        worker.load_model()
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
            else:
                try:
                    outbox.send(encode(WorkerReply(result=getattr(worker, msg.method)(*msg.args))))
                except Exception as e:  # a failed control call is reported, the engine core decides
                    outbox.send(encode(WorkerReply(error=f"{type(e).__name__}: {e}")))
    except Exception as e:
        logger.exception("worker %d failed", rank)
        outbox.send(encode(WorkerReply(error=f"{type(e).__name__}: {e}")))
    finally:
        ctx.destroy(linger=1000)


class MultiprocExecutor:
    """Spawns one worker process per device and exchanges msgspec messages with it."""

    def __init__(self, config: EngineConfig, sock_dir: str) -> None:
        """Spawns the worker and returns at once (it boots meanwhile); `send_model_info` must follow; the first
        call waits for the worker to be ready."""
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

    def send_model_info(self, info_blob: bytes) -> None:
        """The pickled ModelInfo: the worker's first message."""
        send_first(self.to_worker, info_blob, self.proc, "worker process")

    def _recv(self) -> Any:
        while not self.from_worker.poll(_POLL_MS):
            if not self.proc.is_alive():
                raise WorkerDiedError(f"worker process exited with code {self.proc.exitcode}")
        return WORKER_EVENT_DECODER.decode(self.from_worker.recv())

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
        if self.proc.is_alive():
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
