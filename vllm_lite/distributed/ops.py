"""The tensor-parallel collectives as opaque torch.library custom ops (like the attention op): Dynamo and
inductor see one op per call and never trace into torch.distributed, and CUDA-graph capture records the NCCL
kernels the op launches. The ops name their group by string (TPGroup.group_name) and return a new tensor.

Only sharded layers call them, and only when the group has more than one rank.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

_lib = torch.library.Library("vllm_lite", "FRAGMENT")
_lib.define("tp_all_reduce(Tensor x, str group_name) -> Tensor")
_lib.define("tp_all_gather(Tensor x, int world_size, str group_name) -> Tensor")


def _group(name: str) -> dist.ProcessGroup:
    return dist.distributed_c10d._resolve_process_group(name)


def _all_reduce(x: torch.Tensor, group_name: str) -> torch.Tensor:
    out = x.contiguous().clone()
    dist.all_reduce(out, group=_group(group_name))
    return out


def _all_gather(x: torch.Tensor, world_size: int, group_name: str) -> torch.Tensor:
    """x [..., n] on every rank -> [..., world_size * n], rank r's columns at r*n:(r+1)*n."""
    x = x.contiguous()
    group = _group(group_name)
    if x.is_cuda:
        flat = x.new_empty((world_size * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(flat, x, group=group)
        parts = flat.view(world_size, *x.shape).unbind(0)
    else:
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=-1)


def _all_reduce_fake(x: torch.Tensor, group_name: str) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _all_gather_fake(x: torch.Tensor, world_size: int, group_name: str) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], world_size * x.shape[-1]))


for _key in ("CPU", "CUDA"):
    _lib.impl("tp_all_reduce", _all_reduce, _key)
    _lib.impl("tp_all_gather", _all_gather, _key)
torch.library.register_fake("vllm_lite::tp_all_reduce", _all_reduce_fake, lib=_lib)
torch.library.register_fake("vllm_lite::tp_all_gather", _all_gather_fake, lib=_lib)


def tensor_model_parallel_all_reduce(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """Sum of x over the group's ranks (every rank gets it)."""
    return torch.ops.vllm_lite.tp_all_reduce(x, group_name)


def tensor_model_parallel_all_gather(x: torch.Tensor, world_size: int, group_name: str) -> torch.Tensor:
    """The ranks' x concatenated along the last dimension, in rank order (every rank gets it)."""
    return torch.ops.vllm_lite.tp_all_gather(x, world_size, group_name)
