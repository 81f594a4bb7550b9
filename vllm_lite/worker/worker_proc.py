"""A worker process: one rank. It boots from the EngineConfig alone (resolves the model itself, so its imports,
model load and compile start at spawn and never wait for another process), then serves typed calls.

Calls arrive on a PULL socket as protocol Structs (one per call); replies leave on a PUSH socket. Step calls
(ExecuteModel, SampleTokens) get no reply: rank 0 pushes each sampled step's output, in launch order, as soon as
its tokens are on the host (other ranks drop theirs). A ready output goes out before the next call is handled, so
the engine core applies step N while this process prepares step N + 1: the two processes overlap instead of
taking turns (on the H200 the turn-taking cost 0.68 ms per batch-1 step against the in-process worker).
"""
from __future__ import annotations

import logging
import os
import time

import zmq

from vllm_lite.config import EngineConfig, RankConfig
from vllm_lite.gc_utils import freeze_startup_heap
from vllm_lite.logging_utils import setup_logging
from vllm_lite.proc_utils import die_with_parent
from vllm_lite.protocol import (WORKER_CALL_DECODER, DetermineNumBlocks, InitializeKVCache, ModelError,
                                SampleTokens, SchedulerOutput, Shutdown, WorkerReply, describe_model, encode)
from vllm_lite.shared_masks import MaskReader

logger = logging.getLogger("vllm_lite.worker")


def run_worker(config: EngineConfig, rank: RankConfig, in_addr: str, out_addr: str,
               spawned_at: float | None = None) -> None:
    """Worker process main: resolve the model (rank 0 sends its description first; the engine core passes it on to
    the API server), load it, size the KV cache (the profiling forward compiles the model) before anyone asks, then
    say "ready" and serve calls until told to stop."""
    die_with_parent()
    setup_logging()
    if spawned_at is not None:
        logger.info("worker %d process up %.2f s after spawn", rank.rank, time.time() - spawned_at)
    ctx = zmq.Context()
    inbox = ctx.socket(zmq.PULL)
    inbox.connect(in_addr)
    outbox = ctx.socket(zmq.PUSH)
    outbox.connect(out_addr)
    parent = os.getppid()
    try:
        worker = _boot(config, rank, outbox)
        if worker is None:
            return
        num_blocks = worker.runner.determine_num_blocks()  # early: overlaps the engine core's own start-up
        outbox.send(encode(WorkerReply(result="ready")))
        _serve(worker, rank, inbox, outbox, parent, num_blocks)
    except Exception as e:
        logger.exception("worker %d failed", rank.rank)
        outbox.send(encode(WorkerReply(error=f"{type(e).__name__}: {e}")))
    finally:
        ctx.destroy(linger=1000)


def _serve(worker, rank: RankConfig, inbox: zmq.Socket, outbox: zmq.Socket, parent: int, num_blocks: int) -> None:
    """Decode each call and run it through `worker.handle`; step calls get no reply (a failure there ends the
    worker, which the executor sees), control calls get a WorkerReply (with the error, if any). Sampled steps'
    outputs go out as they become ready; while one is still on the device, the loop spins between it and the
    inbox, so a call that arrives meanwhile (the next step, with async scheduling) is launched at once."""
    masks = MaskReader()  # the grammar masks the engine core leaves in shared memory
    try:
        _serve_calls(worker, rank, inbox, outbox, parent, num_blocks, masks)
    finally:
        masks.close()


def _serve_calls(worker, rank: RankConfig, inbox: zmq.Socket, outbox: zmq.Socket, parent: int, num_blocks: int,
                 masks: MaskReader) -> None:
    runner = worker.runner
    pending = runner.pending
    while True:
        if pending:
            if runner.output_ready():
                output = runner.get_output()
                if rank.rank == 0:
                    outbox.send(encode(output))
                continue
            if not inbox.poll(0):
                continue
        elif not inbox.poll(1000):
            if os.getppid() != parent:
                return
            continue
        call = WORKER_CALL_DECODER.decode(inbox.recv())
        if isinstance(call, (SchedulerOutput, SampleTokens)):  # the hot calls first: launch only, no answer
            if isinstance(call, SampleTokens) and call.grammar is not None:
                masks.attach_rows(call.grammar)
            worker.handle(call)
        elif isinstance(call, Shutdown):
            worker.shutdown()
            outbox.send(encode(WorkerReply(result="bye")))
            return
        elif isinstance(call, DetermineNumBlocks):
            outbox.send(encode(WorkerReply(result=num_blocks)))
        else:
            try:
                result = worker.handle(call)
            except Exception as e:  # a failed control call is reported; the engine core decides
                outbox.send(encode(WorkerReply(error=f"{type(e).__name__}: {e}")))
            else:
                outbox.send(encode(WorkerReply(result=result)))
                if isinstance(call, InitializeKVCache):  # KV cache and CUDA graphs exist: start-up is done
                    freeze_startup_heap()


def _boot(config: EngineConfig, rank: RankConfig, outbox: zmq.Socket):
    """Resolve the model; rank 0 sends its description (or, returning None, what is wrong with it: the API server
    prints that as one line). Then build the Worker (device, model load)."""
    start = time.perf_counter()
    try:
        from vllm_lite.model_loader import resolve_model
        imported = time.perf_counter()
        info = resolve_model(config.model, config.load, config.device.resolved_device())
        from vllm_lite.models import check_tensor_parallel
        check_tensor_parallel(info.hf_config, config.parallel.tensor_parallel_size)
    except Exception as e:  # noqa: BLE001 - any resolution failure is about the model (bad path, config, ...)
        logger.debug("worker %d: model resolution failed", rank.rank, exc_info=True)
        outbox.send(encode(ModelError(f"{type(e).__name__}: {e}")))
        return None
    if rank.rank == 0:
        outbox.send(encode(describe_model(info)))
    logger.info("worker %d: model %r -> %s resolved in %.2f s (+ %.2f s of imports)", rank.rank,
                config.model.model, info.path, time.perf_counter() - imported, imported - start)
    start = time.perf_counter()
    from vllm_lite.worker.worker import Worker
    logger.info("worker %d imports done in %.2f s", rank.rank, time.perf_counter() - start)
    return Worker(config, info, rank)
