"""ModelInfo -> a model on the device, in the resolved dtype, with its weights loaded."""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

import torch
from torch import nn

from vllm_lite.attention import AttentionContext, TorchAttentionBackend
from vllm_lite.config import KernelConfig, LoadConfig
from vllm_lite.distributed import TPGroup
from vllm_lite.model_loader.resolve import ModelInfo
from vllm_lite.model_loader.weights import checkpoint_weights, init_dummy_weights
from vllm_lite.models.registry import get_model_class

logger = logging.getLogger("vllm_lite.model_loader")


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def load_model(info: ModelInfo, load_config: LoadConfig, device: str | torch.device, attn_ctx: AttentionContext,
               seed: int = 0, *, kernels: KernelConfig | None = None, tp: TPGroup | None = None) -> nn.Module:
    """Build the model directly on `device` in `info.dtype` (no host copy of the parameters) and fill its weights
    from the checkpoint, or with seeded random values for load_format "dummy". `kernels` (the engine's KernelConfig;
    default KernelConfig.from_env()) goes to the model's constructor (skinny-GEMM projections); `tp` (None: one rank)
    makes it this rank's shard of a tensor-parallel model."""
    t0 = time.perf_counter()
    cls = get_model_class(info.architecture)
    with _default_dtype(info.dtype), torch.device(device):
        model = cls(info.hf_config, attn_ctx, kernels=kernels, tp=tp)
    if load_config.load_format == "dummy" or info.load_format == "dummy":
        init_dummy_weights(model, seed)
        what = "dummy weights"
    else:
        model.load_weights(checkpoint_weights(info.path))
        what = f"weights from {info.path}"
    model.eval()
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    logger.info("loaded %s (%s, %s, %.1f MB) with %s in %.1fs", info.architecture, device,
                str(info.dtype).removeprefix("torch."), nbytes / 2**20, what, time.perf_counter() - t0)
    return model


def rank_weight_bytes(info: ModelInfo, tp_size: int) -> int:
    """Bytes of rank 0's parameters in a tp_size-way tensor-parallel model, from a copy built on the meta device
    (no memory, no weights): what each rank's decode step reads, for benchmarks' bandwidth floors."""
    with _default_dtype(info.dtype), torch.device("meta"):
        model = get_model_class(info.architecture)(info.hf_config, AttentionContext(TorchAttentionBackend()),
                                                   tp=TPGroup(0, tp_size))
    return sum(p.numel() * p.element_size() for p in model.parameters())
