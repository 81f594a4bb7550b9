"""Triton kernels with plain-PyTorch references (installed as vllm_lite.kernels)."""
