"""One worker process per rank, driven over ZeroMQ with the protocol's typed calls.

Each step's calls are encoded once and sent to every rank (a PUSH socket per rank); results come from rank 0.
Replies are awaited while watching every worker's process sentinel, so a dead worker surfaces as an error in the
engine core within a fraction of a second instead of a hang.
"""
from __future__ import annotations

import dataclasses
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import time
from typing import Any

import zmq

from vllm_lite import envs
from vllm_lite.config import EngineConfig, ParallelConfig, RankConfig
from vllm_lite.distributed import pick_init_method
from vllm_lite.proc_utils import ipc_address
from vllm_lite.protocol import (WORKER_EVENT_DECODER, DetermineNumBlocks, GrammarOutput,
                                InitializeKVCache, ModelDescription, ModelError, ModelRunnerOutput, SampleTokens,
                                SchedulerOutput, Shutdown, WorkerReply, encode)
from vllm_lite.shared_masks import MaskSlots
from vllm_lite.worker.worker_proc import run_worker

_POLL_MS = 200
_SAMPLE = encode(SampleTokens())


class WorkerDiedError(RuntimeError):
    pass


def _replica_init_method(parallel: ParallelConfig) -> str:
    """The engine's init method. Data-parallel replicas are separate process groups: replica i > 0 of a configured
    tcp://host:port (or MASTER_ADDR / MASTER_PORT) uses port + i so the groups do not meet (a free port picked
    per engine is already its own)."""
    method = pick_init_method(parallel.distributed_init_method)
    configured = parallel.distributed_init_method is not None or envs.distributed_master() is not None
    if not configured or parallel.data_parallel_rank == 0 or not method.startswith("tcp://"):
        return method
    host, _, port = method[len("tcp://"):].rpartition(":")
    return f"tcp://{host}:{int(port) + parallel.data_parallel_rank}"


class MultiprocExecutor:
    def __init__(self, config: EngineConfig, sock_dir: str, world_size: int | None = None) -> None:
        """Spawns the workers and returns at once (they boot meanwhile); `wait_model_description` must come first,
        then the first call waits for every rank to be ready (model loaded, KV cache size known).
        world_size defaults to the config's (tests may run several ranks of one replicated model). Tensor-parallel
        ranks get one init method, chosen here once (a free port unless configured), in the config they boot
        from; every worker starts with NVLink multicast disabled in its environment."""
        self.world_size = world_size or config.parallel.world_size
        envs.disable_nvlink_multicast()  # inherited by the spawned workers
        if config.parallel.tensor_parallel_size > 1:
            parallel = dataclasses.replace(config.parallel, distributed_init_method=_replica_init_method(
                config.parallel))
            config = dataclasses.replace(config, parallel=parallel)
        # data-parallel replica i drives devices i * tp .. (i + 1) * tp - 1
        first_device = config.parallel.data_parallel_rank * config.parallel.tensor_parallel_size
        self.ctx = zmq.Context()
        self.to_workers: list[zmq.Socket] = []
        self.from_workers: list[zmq.Socket] = []
        self.procs: list[mp.process.BaseProcess] = []
        spawn = mp.get_context("spawn")
        for rank in range(self.world_size):
            in_addr = ipc_address(sock_dir, f"worker{rank}-in")
            out_addr = ipc_address(sock_dir, f"worker{rank}-out")
            push = self.ctx.socket(zmq.PUSH)
            push.bind(in_addr)
            pull = self.ctx.socket(zmq.PULL)
            pull.bind(out_addr)
            self.to_workers.append(push)
            self.from_workers.append(pull)
            rank_config = RankConfig(rank=rank, world_size=self.world_size, device_index=first_device + rank)
            proc = spawn.Process(target=run_worker, name=f"vllm-lite-worker-{rank}",
                                 args=(config, rank_config, in_addr, out_addr, time.time()))
            proc.start()
            self.procs.append(proc)
        self._ready = False
        self._mask_slots = MaskSlots()  # the grammar masks' shared memory

    # ---- receiving ---------------------------------------------------------------------------------------------
    def _check_alive(self) -> None:
        for r, proc in enumerate(self.procs):
            if not proc.is_alive():
                raise WorkerDiedError(f"worker process {r} exited with code {proc.exitcode}")

    def _worker_error(self, rank: int, error: str) -> Exception:
        """What a rank's error report surfaces as: with several ranks, a failed collective usually means a peer
        died, so a peer that is dead (or dies within a second) is the error reported."""
        peers = [(r, p) for r, p in enumerate(self.procs) if r != rank]
        if peers:
            mp_connection.wait([p.sentinel for _, p in peers], timeout=1.0)
        for r, proc in peers:
            if not proc.is_alive():
                return WorkerDiedError(f"worker process {r} exited with code {proc.exitcode} (worker {rank}: "
                                       f"{error})")
        return RuntimeError(f"worker {rank} error: {error}")

    def _recv_frame(self, rank: int) -> bytes:
        sock = self.from_workers[rank]
        while not sock.poll(_POLL_MS):
            self._check_alive()
        return sock.recv()

    def _reply(self, rank: int) -> Any:
        reply = WORKER_EVENT_DECODER.decode(self._recv_frame(rank))
        if not isinstance(reply, WorkerReply):
            raise RuntimeError(f"unexpected message from worker {rank}: {type(reply).__name__}")
        if reply.error is not None:
            raise self._worker_error(rank, reply.error)
        return reply.result

    def wait_model_description(self) -> tuple[ModelDescription | ModelError, bytes]:
        """Rank 0's first message, decoded and as received (to pass on unchanged): the resolved model, or what is
        wrong with it. Raises WorkerDiedError if a worker exits first."""
        frame = self._recv_frame(0)
        msg = WORKER_EVENT_DECODER.decode(frame)
        if isinstance(msg, WorkerReply):
            raise RuntimeError(f"worker error: {msg.error}")
        if not isinstance(msg, (ModelDescription, ModelError)):
            raise RuntimeError(f"unexpected first message from worker: {type(msg).__name__}")
        return msg, frame

    # ---- calls -------------------------------------------------------------------------------------------------
    def _broadcast(self, frame: bytes) -> None:
        """Send to every rank; a PUSH to a rank whose process is gone would block forever, so a send that cannot
        go out at once waits while watching the workers."""
        for sock in self.to_workers:
            while True:
                try:
                    sock.send(frame, flags=zmq.NOBLOCK)
                    break
                except zmq.Again:
                    self._check_alive()
                    sock.poll(_POLL_MS, zmq.POLLOUT)

    def _call_all(self, call: Any) -> list[Any]:
        if not self._ready:  # every rank says "ready" once its model is loaded
            for rank in range(self.world_size):
                self._reply(rank)
            self._ready = True
        self._broadcast(encode(call))
        return [self._reply(rank) for rank in range(self.world_size)]

    def determine_num_blocks(self) -> int:
        return min(int(n) for n in self._call_all(DetermineNumBlocks()))

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self._call_all(InitializeKVCache(num_blocks))

    def execute_model(self, scheduler_output: SchedulerOutput) -> None:
        self._broadcast(encode(scheduler_output))

    def sample_tokens(self, grammar_output: GrammarOutput | None) -> None:
        grammar_output = self._mask_slots.outgoing(grammar_output)  # rows in a lent slot go by its name
        self._broadcast(_SAMPLE if grammar_output is None else encode(SampleTokens(grammar_output)))

    def get_output(self) -> ModelRunnerOutput:
        """Rank 0 pushes each sampled step's output unasked, in launch order (worker_proc says when)."""
        out = WORKER_EVENT_DECODER.decode(self._recv_frame(0))
        if isinstance(out, WorkerReply):
            raise self._worker_error(0, out.error)
        self._mask_slots.output_received()
        return out

    def grammar_host_buffer(self, rows: int, num_words: int) -> Any:
        """Where the engine core fills the next step's mask: a shared-memory slot the workers read in place
        (vllm_lite/shared_masks.py), or None while every slot may still be read (the mask then goes in the
        SampleTokens message)."""
        return self._mask_slots.lend(rows, num_words)

    def shutdown(self) -> None:
        """Ask serving workers to stop; ones still booting read no messages, so they are terminated."""
        if self._ready and all(p.is_alive() for p in self.procs):
            for sock in self.to_workers:
                try:
                    sock.send(encode(Shutdown()), flags=zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
            for proc in self.procs:
                proc.join(5)
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self.ctx.destroy(linger=0)
        self._mask_slots.close()
