"""Picks the attention backend by name; FlashInfer is imported only here, lazily (CPU machines lack it)."""
from __future__ import annotations

import importlib.util
import logging

import torch

from vllm_lite.attention.backend import AttentionBackend
from vllm_lite.attention.torch_backend import TorchAttentionBackend
from vllm_lite.config import KernelConfig

logger = logging.getLogger("vllm_lite.attention")

_FLASHINFER_DTYPES = (torch.bfloat16, torch.float16)


def make_backend(name: str, *, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 dtype: torch.dtype, device: torch.device, max_num_seqs: int,
                 max_blocks_per_seq: int, kernels: KernelConfig | None = None) -> AttentionBackend:
    """name: "auto" (FlashInfer on CUDA when importable and the dtype is bf16/fp16, else torch), "torch",
    "flashinfer" (a clear error when it cannot run here). `kernels` (the engine's KernelConfig; default
    KernelConfig.from_env()) chooses FlashInfer's decode kernel family (flashinfer_tensor_cores). The torch backend is
    the reference and always writes the KV cache with the torch reference."""
    device = torch.device(device)
    kernels = kernels if kernels is not None else KernelConfig.from_env()
    if name == "torch":
        return TorchAttentionBackend()
    if name not in ("auto", "flashinfer"):
        raise ValueError(f"unknown attention backend {name!r}; choose auto, torch or flashinfer")
    problem = _flashinfer_problem(device, dtype)
    if problem is None:
        try:
            from vllm_lite.attention.flashinfer_backend import FlashInferBackend
        except ImportError as e:  # installed but broken (e.g. a missing runtime dependency)
            problem = f"flashinfer failed to import: {e}"
        else:
            return FlashInferBackend(num_heads, num_kv_heads, head_dim, scale, dtype, device, max_num_seqs,
                                     max_blocks_per_seq, use_tensor_cores=kernels.flashinfer_tensor_cores,
                                     kv_write_kernel=kernels.kv_write_kernel)
    if name == "flashinfer":
        raise ValueError(f"attention_backend='flashinfer' cannot run: {problem}; use 'torch'")
    if device.type == "cuda":
        logger.warning("using the torch attention backend: %s", problem)
    return TorchAttentionBackend()


def _flashinfer_problem(device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"it needs a CUDA device (device is {device})"
    if dtype not in _FLASHINFER_DTYPES:
        return f"it supports bfloat16 and float16, not {dtype}"
    if importlib.util.find_spec("flashinfer") is None:
        return "the flashinfer package is not installed (pip install flashinfer-python)"
    return None
