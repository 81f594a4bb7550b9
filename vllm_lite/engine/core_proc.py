"""The engine core process: a busy loop that takes requests and aborts from the API server, steps the engine
and streams EngineCoreOutputs back. It dies with its parent and reports its own failures before exiting.

Start-up is overlapped: this module imports nothing heavy and the model description arrives pickled as the first
message (the API server resolves it while this process boots), so the process spawns its worker first and only then
imports torch/transformers and unpickles it, while the worker boots.
"""
from __future__ import annotations

import importlib
import logging
import os
import pickle
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING

import zmq

from vllm_lite.config import EngineConfig
from vllm_lite.engine.ipc import (CORE_INPUT_DECODER, AbortRequests, EngineDead, EngineReady, die_with_parent,
                                  encode)
from vllm_lite.engine.messages import EngineCoreOutput, EngineCoreOutputs
from vllm_lite.logging_utils import setup_logging

if TYPE_CHECKING:
    from vllm_lite.engine.core import EngineCore

logger = logging.getLogger("vllm_lite.engine_core")


class _Shutdown(Exception):
    pass


def _raise_shutdown(signum: int, frame: object) -> None:
    raise _Shutdown()


def run_engine_core(config: EngineConfig, in_addr: str, out_addr: str, sock_dir: str,
                    spawned_at: float | None = None) -> None:
    """The first frame on the input socket is the pickled ModelInfo (unpickling it imports torch and
    transformers; done after the worker is spawned and the frame is passed on to it)."""
    die_with_parent()
    setup_logging()
    if spawned_at is not None:  # interpreter start + imports + unpickling the arguments
        logger.info("engine core process up %.2f s after spawn", time.time() - spawned_at)
    signal.signal(signal.SIGTERM, _raise_shutdown)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the API server decides when to stop on Ctrl-C
    ctx = zmq.Context()
    inbox = ctx.socket(zmq.PULL)
    inbox.connect(in_addr)
    outbox = ctx.socket(zmq.PUSH)
    outbox.connect(out_addr)
    core = None
    code = 0
    try:
        from vllm_lite.worker.worker_proc import MultiprocExecutor
        executor = MultiprocExecutor(config, sock_dir)  # the worker boots from here on
        start = time.perf_counter()
        # Heavy imports in a thread while waiting for the API server to resolve the model.
        importer = threading.Thread(target=importlib.import_module, args=("vllm_lite.engine.core",), daemon=True)
        importer.start()
        info_blob = inbox.recv()
        executor.send_model_info(info_blob)
        waited = time.perf_counter() - start
        importer.join()
        from vllm_lite.engine.core import EngineCore  # re-raises here if the import failed
        info = pickle.loads(info_blob)
        logger.info("engine core: model description after %.2f s, imports done after %.2f s (while the worker "
                    "boots)", waited, time.perf_counter() - start)
        core = EngineCore(config, info, executor)
        outbox.send(encode(EngineReady(core.num_blocks)))
        _busy_loop(core, inbox, outbox)
    except _Shutdown:
        logger.info("engine core shutting down")
    except Exception as e:
        logger.exception("engine core failed")
        outbox.send(encode(EngineDead(f"{type(e).__name__}: {e}")))
        code = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if core is not None:
            core.shutdown()
        elif "executor" in locals():
            executor.shutdown()
        ctx.destroy(linger=1000)
    sys.exit(code)


def _busy_loop(core: EngineCore, inbox: zmq.Socket, outbox: zmq.Socket) -> None:
    parent = os.getppid()
    while True:
        # Block (with a timeout to notice a dead parent) only when there is nothing to step.
        timeout = 0 if core.has_unfinished_requests() else 1000
        handled = False
        while inbox.poll(timeout):
            _handle(core, CORE_INPUT_DECODER.decode(inbox.recv()), outbox)
            timeout, handled = 0, True
        if os.getppid() != parent:
            raise _Shutdown()
        # An empty step still carries fresh stats, so the server's gauges see aborts and admissions at once.
        outputs = core.step() if core.has_unfinished_requests() or handled else None
        if outputs is not None and (outputs.outputs or handled):
            outbox.send(encode(outputs))


def _handle(core: EngineCore, msg: object, outbox: zmq.Socket) -> None:
    if isinstance(msg, AbortRequests):
        core.abort_requests(msg.request_ids)
        return
    try:
        core.add_request(msg)
    except ValueError as e:  # the API server validates first; anything left ends this request, not the engine
        logger.warning("rejected request %s: %s", msg.request_id, e)
        outbox.send(encode(EngineCoreOutputs([EngineCoreOutput(msg.request_id, [], finish_reason="abort",
                                                               stop_reason=str(e))])))
