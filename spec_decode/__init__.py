"""Speculative decoding proposers and rejection sampler (installed as vllm_lite.spec_decode)."""
