"""Torch.compile wrapper, custom-op registration and CUDA graph capture (installed as vllm_lite.compile)."""
