"""The engine core process: a busy loop that takes requests and aborts from the API server, steps the engine
and streams EngineCoreOutputs back. It dies with its parent and reports its own failures before exiting.

Start-up is overlapped: this module imports nothing heavy, so the process spawns its worker at once (the worker
resolves the model and loads it on its own), imports the engine in a thread meanwhile, and passes the worker's
model description on to the API server as soon as it comes.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING

import zmq

from vllm_lite.config import EngineConfig
from vllm_lite.executor.multiproc import MultiprocExecutor
from vllm_lite.gc_utils import freeze_startup_heap
from vllm_lite.logging_utils import setup_logging
from vllm_lite.proc_utils import die_with_parent
from vllm_lite.protocol import (CORE_INPUT_DECODER, AbortRequests, EngineCoreOutput, EngineCoreOutputs, EngineDead,
                                EngineReady, ModelError, encode)

if TYPE_CHECKING:
    from vllm_lite.engine.core import EngineCore

logger = logging.getLogger("vllm_lite.engine_core")

_REPORT_LINGER_MS = 60_000


class _Shutdown(Exception):
    pass


def _raise_shutdown(signum: int, frame: object) -> None:
    raise _Shutdown()


def run_engine_core(config: EngineConfig, in_addr: str, out_addr: str, sock_dir: str,
                    spawned_at: float | None = None) -> None:
    """Spawn the worker, pass its model description on to the API server (the first message on the output
    socket), build the EngineCore, say EngineReady, then loop. Failures go out as EngineDead before exiting."""
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
        executor = MultiprocExecutor(config, sock_dir)  # the worker boots from here on
        core = _start(config, executor, outbox)
        if core is None:
            code = 1  # the model cannot be served; the API server prints why
        else:
            outbox.send(encode(EngineReady(core.num_blocks)))
            freeze_startup_heap()
            _busy_loop(core, inbox, outbox)
    except _Shutdown:
        logger.info("engine core shutting down")
    except Exception as e:
        logger.exception("engine core failed")
        outbox.send(encode(EngineDead(f"{type(e).__name__}: {e}")))
        code = 1
    finally:
        try:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        except _Shutdown:  # the API server's SIGTERM came while the handler was being switched: already stopping
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if core is not None:
            core.shutdown()
        elif "executor" in locals():
            executor.shutdown()
        # A failure report may be sent before the API server binds (it may still be importing): wait for it to be
        # delivered, unless stopped meanwhile (nothing is left to clean up, so SIGTERM may end this at once).
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        ctx.destroy(linger=_REPORT_LINGER_MS if code else 1000)
    sys.exit(code)


def _start(config: EngineConfig, executor: MultiprocExecutor, outbox: zmq.Socket) -> EngineCore | None:
    """Pass the worker's model description on to the API server and build the EngineCore (None: the worker says
    the model cannot be served). The engine is imported in a thread meanwhile."""
    start = time.perf_counter()
    importer = threading.Thread(target=importlib.import_module, args=("vllm_lite.engine.core",), daemon=True)
    importer.start()
    desc, frame = executor.wait_model_description()
    outbox.send(frame)
    if isinstance(desc, ModelError):
        return None
    waited = time.perf_counter() - start
    importer.join()
    from vllm_lite.engine.core import EngineCore  # re-raises here if the import failed
    from vllm_lite.model_loader import ModelInfo
    info = ModelInfo.from_description(desc)
    logger.info("engine core: model description after %.2f s, imports done after %.2f s (while the worker "
                "boots)", waited, time.perf_counter() - start)
    from vllm_lite.structured_output.manager import make_manager
    from vllm_lite.tokenizer import load_tokenizer
    loader = None if config.model.skip_tokenizer_init else functools.partial(load_tokenizer, info)
    return EngineCore(config, info, executor, grammar=make_manager(config, info, loader))


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
        stopped = core.abort_requests(msg.request_ids)
        if stopped:  # the API server has finished these already (stop strings, disconnects): its metrics see them
            outbox.send(encode(EngineCoreOutputs(stopped)))
        return
    try:
        core.add_request(msg)
    except ValueError as e:  # the API server validates first; anything left ends this request, not the engine
        logger.warning("rejected request %s: %s", msg.request_id, e)
        outbox.send(encode(EngineCoreOutputs([EngineCoreOutput(msg.request_id, [], finish_reason="abort",
                                                               stop_reason=str(e))])))
