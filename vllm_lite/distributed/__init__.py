"""Tensor parallelism: the process group of one engine's ranks and the collectives the sharded layers call."""
from vllm_lite.distributed.ops import tensor_model_parallel_all_gather, tensor_model_parallel_all_reduce
from vllm_lite.distributed.parallel_state import (TPGroup, destroy_tensor_parallel, init_tensor_parallel,
                                                   pick_init_method)

__all__ = ["TPGroup", "destroy_tensor_parallel", "init_tensor_parallel", "pick_init_method",
           "tensor_model_parallel_all_gather", "tensor_model_parallel_all_reduce"]
