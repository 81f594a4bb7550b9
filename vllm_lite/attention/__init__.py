"""Attention over the paged KV cache: one interface, a torch reference backend and (on CUDA) FlashInfer."""
from vllm_lite.attention.backend import AttentionContext, AttentionSpec, StepMetadata
from vllm_lite.attention.layer import Attention
from vllm_lite.attention.torch_backend import TorchAttentionBackend

__all__ = ["Attention", "AttentionContext", "AttentionSpec", "StepMetadata", "TorchAttentionBackend"]
