"""Spawning the engine-core process, cheaply and early.

`vllm-lite serve` calls `spawn_engine_core` before it imports FastAPI: the engine core (and the worker it spawns at
once) boot from the config alone while the API server imports. The model is resolved once, in the worker; its
description comes back as the first message on the engine core's output socket (`AsyncEngineClient.start` reads it),
and so does what is wrong with it. Only light modules are imported here.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import time
from dataclasses import dataclass

from vllm_lite.config import EngineConfig
from vllm_lite.proc_utils import ipc_address


@dataclass
class EngineCoreProcess:
    """A spawned engine core: its process and the IPC addresses the API server binds."""
    proc: mp.process.BaseProcess
    sock_dir: str
    in_addr: str
    out_addr: str

    def stop(self) -> None:
        """Terminate it (it stops its workers), wait, and remove the socket folder; no process is left behind."""
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(10)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(5)
        try:
            for name in os.listdir(self.sock_dir):
                os.unlink(os.path.join(self.sock_dir, name))
            os.rmdir(self.sock_dir)
        except OSError:
            pass


def spawn_engine_core(config: EngineConfig) -> EngineCoreProcess:
    """Start the engine-core process; it connects to the addresses (the API server binds them later)."""
    from vllm_lite.engine.core_proc import run_engine_core
    sock_dir = tempfile.mkdtemp(prefix="vllm-lite-")
    os.chmod(sock_dir, 0o700)
    in_addr, out_addr = ipc_address(sock_dir, "input"), ipc_address(sock_dir, "output")
    parallel = config.parallel
    name = "vllm-lite-engine-core" + (f"-{parallel.data_parallel_rank}" if parallel.data_parallel_size > 1 else "")
    proc = mp.get_context("spawn").Process(target=run_engine_core, name=name, daemon=False,
                                           args=(config, in_addr, out_addr, sock_dir, time.time()))
    proc.start()
    return EngineCoreProcess(proc, sock_dir, in_addr, out_addr)
