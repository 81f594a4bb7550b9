"""Projections, plain and tensor-parallel, each carrying the loader that puts checkpoint tensors into its shard.

- Linear: the per-rank matmul (nn.Linear, or the skinny-GEMM op on CUDA).
- MergedColumnParallelLinear / QKVParallelLinear: several HF projections fused along the output dimension (gate/up,
  q/k/v); each rank holds its slice of every part (KV heads replicated when there are fewer than ranks).
- RowParallelLinear: the input dimension is split; the partial products are summed by an all-reduce, then the
  bias (held whole on every rank) is added once.

With one rank every class is exactly Linear's forward: the same kernels, no collective, no extra op.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from vllm_lite.distributed import TPGroup, tensor_model_parallel_all_reduce

_SINGLE = TPGroup()


class WeightLoadError(ValueError):
    """A checkpoint does not fit the model: a tensor is missing or has the wrong shape."""


def check_shape(tensor: torch.Tensor, expected: tuple[int, ...], where: str = "") -> None:
    """WeightLoadError when a checkpoint tensor has not the (whole, unsharded) shape the model expects."""
    if tuple(tensor.shape) != tuple(expected):
        raise WeightLoadError(f"checkpoint has {tuple(tensor.shape)}, model expects {tuple(expected)}{where}")


def default_weight_loader(param: torch.Tensor, tensor: torch.Tensor, shard_id: str | None = None) -> None:
    """A whole, unsharded parameter: copy after checking the shape."""
    check_shape(tensor, param.shape)
    param.data.copy_(tensor)


def fused_rows_loader(offsets: dict[str, tuple[int, int]]) -> Callable[..., None]:
    """Loader of a single-rank fused parameter described by {shard id: (row offset, rows)} (e.g. a plain Linear
    with `shard_offsets`, as the EAGLE heads build)."""
    def load(param: torch.Tensor, tensor: torch.Tensor, shard_id: str | None = None) -> None:
        off, size = offsets[shard_id]
        dest = param.data.narrow(0, off, size)
        check_shape(tensor, dest.shape, f" (rows {off}:{off + size} of a fused parameter)")
        dest.copy_(tensor)
    return load


def weight_loader_of(param: torch.Tensor) -> Callable[..., None]:
    return getattr(param, "weight_loader", default_weight_loader)


class Linear(nn.Linear):
    """A projection; built with skinny=True (the model passes KernelConfig.skinny_gemm), on the devices in
    `skinny_devices` it goes through the opaque `vllm_lite::skinny_linear` op, which sends decode-sized calls to
    kernels/skinny_gemm.py where that measured faster than cuBLAS; otherwise it is nn.Linear (so CPU graphs keep
    inductor's own matmuls)."""

    skinny_devices: tuple[str, ...] = ("cuda",)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, skinny: bool = False) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.skinny = skinny

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.skinny and self.weight.device.type in self.skinny_devices:
            return torch.ops.vllm_lite.skinny_linear(x, self.weight, self.bias)
        return super().forward(x)


class MergedColumnParallelLinear(Linear):
    """Parts (name, whole output rows) fused along the output dimension, each split evenly over the ranks: this
    rank holds rows [r*n/tp, (r+1)*n/tp) of every part, parts in order. HF tensors load by part name."""

    def __init__(self, in_features: int, parts: list[tuple[str, int]], bias: bool = True, skinny: bool = False,
                 tp: TPGroup | None = None) -> None:
        tp = tp or _SINGLE
        # part -> (whole rows, offset in this rank's parameter, rows here, first checkpoint row)
        self.parts: dict[str, tuple[int, int, int, int]] = {}
        offset = 0
        for name, rows in parts:
            local = tp.divide(rows, f"{name} output size")
            self.parts[name] = (rows, offset, local, tp.rank * local)
            offset += local
        self._init(in_features, offset, bias, skinny)

    def _init(self, in_features: int, out_features: int, bias: bool, skinny: bool) -> None:
        super().__init__(in_features, out_features, bias=bias, skinny=skinny)
        self.shard_offsets = {name: (off, size) for name, (_, off, size, _) in self.parts.items()}
        for p in self.parameters():
            p.weight_loader = self.weight_loader

    def weight_loader(self, param: torch.Tensor, tensor: torch.Tensor, shard_id: str | None = None) -> None:
        rows, off, size, start = self.parts[shard_id]
        check_shape(tensor, (rows, *param.shape[1:]), f" (the {shard_id} part of a fused parameter)")
        dest = param.data.narrow(0, off, size)
        dest.copy_(tensor.narrow(0, start, size))


class QKVParallelLinear(MergedColumnParallelLinear):
    """q, k and v fused; query heads split over the ranks, KV heads too, or replicated when there are fewer KV heads
    than ranks (each rank holds the one its query heads attend to). Refuses what does not split."""

    def __init__(self, in_features: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = True,
                 skinny: bool = False, tp: TPGroup | None = None) -> None:
        tp = tp or _SINGLE
        self.num_heads = tp.divide(num_heads, "num_attention_heads")
        self.num_kv_heads, first_kv = kv_heads_of_rank(num_kv_heads, tp)
        q_rows, kv_rows = self.num_heads * head_dim, self.num_kv_heads * head_dim
        self.parts = {"q": (num_heads * head_dim, 0, q_rows, tp.rank * q_rows),
                      "k": (num_kv_heads * head_dim, q_rows, kv_rows, first_kv * head_dim),
                      "v": (num_kv_heads * head_dim, q_rows + kv_rows, kv_rows, first_kv * head_dim)}
        self._init(in_features, q_rows + 2 * kv_rows, bias, skinny)


def kv_heads_of_rank(num_kv_heads: int, tp: TPGroup) -> tuple[int, int]:
    """(KV heads this rank holds, index of its first): an even split, or one replicated head when there are fewer
    KV heads than ranks (the ranks must then be a multiple of the KV heads)."""
    if num_kv_heads >= tp.world_size:
        local = tp.divide(num_kv_heads, "num_key_value_heads")
        return local, tp.rank * local
    if tp.world_size % num_kv_heads:
        raise ValueError(f"num_key_value_heads ({num_kv_heads}) < tensor_parallel_size ({tp.world_size}) needs "
                         f"tensor_parallel_size to be a multiple of it (each KV head replicated on whole ranks)")
    return 1, tp.rank // (tp.world_size // num_kv_heads)


class RowParallelLinear(Linear):
    """The input dimension split over the ranks (the output of a column-parallel layer); the ranks' partial
    products are all-reduced, then the bias (whole on every rank) is added."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, skinny: bool = False,
                 tp: TPGroup | None = None) -> None:
        tp = tp or _SINGLE
        self.tp_rank, self.tp_size, self.tp_group = tp.rank, tp.world_size, tp.group_name
        self.full_in = in_features
        super().__init__(tp.divide(in_features, "projection input size"), out_features, bias=bias, skinny=skinny)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: torch.Tensor, tensor: torch.Tensor, shard_id: str | None = None) -> None:
        check_shape(tensor, (param.shape[0], self.full_in))
        local = param.shape[1]
        param.data.copy_(tensor.narrow(1, self.tp_rank * local, local))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return super().forward(x)
        if self.skinny and self.weight.device.type in self.skinny_devices:
            out = torch.ops.vllm_lite.skinny_linear(x, self.weight, None)
        else:
            out = nn.functional.linear(x, self.weight)
        out = tensor_model_parallel_all_reduce(out, self.tp_group)
        return out if self.bias is None else out + self.bias
