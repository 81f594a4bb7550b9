"""Torch.compile wrapper, custom-op registration and CUDA graph capture (installed as vllm_lite.compile).

- custom_ops:  `torch.ops.vllm_lite.attention(q, k, v, cos, sin, ...)`, the opaque q/k norm + rotary + KV-write +
               attention op, and its context registry (`register_context`, `register_layer`).
- compiler:    `compile_model(model, config)` -> forward callable (inductor, dynamic tokens, fullgraph, disk cache).
- cuda_graphs: `CUDAGraphRunner` (pure-decode capture/replay), `default_capture_sizes`, `measure_graph_memory`.
"""
from vllm_lite.compile.compiler import CompiledForward, compile_model, configure_compile_cache
from vllm_lite.compile.cuda_graphs import CUDAGraphRunner, default_capture_sizes, measure_graph_memory
from vllm_lite.compile.custom_ops import register_context, register_layer

__all__ = ["CUDAGraphRunner", "CompiledForward", "compile_model", "configure_compile_cache", "default_capture_sizes",
           "measure_graph_memory", "register_context", "register_layer"]
