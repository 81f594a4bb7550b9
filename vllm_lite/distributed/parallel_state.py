"""The tensor-parallel group of one engine: who this rank is, how many ranks share the model, and the
torch.distributed process group they talk over (gloo on CPU, NCCL on CUDA).

The group is an explicit object passed to the model and its layers; beyond it, the only state is what
torch.distributed itself keeps (the default group). A single rank gets `TPGroup()` and never touches
torch.distributed, so the one-GPU path runs no collective and no extra op.
"""
from __future__ import annotations

import datetime
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from vllm_lite import envs

logger = logging.getLogger("vllm_lite.distributed")

# A rank blocked in a collective whose peer died gives up after this long (the executor normally kills it first:
# it watches every rank's process and ends the survivors once one is gone).
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class TPGroup:
    """rank / world_size of this process in its engine's tensor-parallel group; group_name names the
    torch.distributed process group (the custom ops resolve it by name, so compiled graphs hold a string, not an
    object). world_size 1: no process group at all."""
    rank: int = 0
    world_size: int = 1
    group_name: str = ""

    @property
    def is_parallel(self) -> bool:
        return self.world_size > 1

    def divide(self, n: int, what: str) -> int:
        """n split evenly over the ranks; ValueError naming `what` when it does not split."""
        if n % self.world_size:
            raise ValueError(f"{what} ({n}) is not divisible by tensor_parallel_size ({self.world_size})")
        return n // self.world_size


def pick_init_method(configured: str | None) -> str:
    """The init method every rank of one engine uses, chosen once by whoever spawns them: the configured one, else
    MASTER_ADDR / MASTER_PORT from the environment, else a free TCP port on this host."""
    if configured:
        return configured
    master = envs.distributed_master()
    if master is not None:
        return f"tcp://{master[0]}:{master[1]}"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def init_tensor_parallel(rank: int, world_size: int, init_method: str | None, device: torch.device) -> TPGroup:
    """Join the engine's process group (blocks until every rank has joined); world_size 1 joins nothing."""
    if world_size == 1:
        return TPGroup()
    if init_method is None:
        raise ValueError("tensor parallelism needs a distributed init method (the executor picks one per engine)")
    envs.disable_nvlink_multicast()  # before NCCL is loaded (the executor also sets it before spawning)
    backend = "nccl" if device.type == "cuda" else "gloo"
    start = time.perf_counter()
    kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=COLLECTIVE_TIMEOUT, **kwargs)
    group = dist.group.WORLD
    logger.info("rank %d/%d joined the %s group at %s in %.2f s", rank, world_size, backend, init_method,
                time.perf_counter() - start)
    return TPGroup(rank, world_size, group.group_name)


def destroy_tensor_parallel(tp: TPGroup) -> None:
    if tp.is_parallel and dist.is_initialized():
        dist.destroy_process_group()
