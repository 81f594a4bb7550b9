"""Structured-output benchmark; see vllm_lite/benchmarks/structured.py (same as `vllm-lite bench structured`)."""
from vllm_lite.benchmarks.structured import main

if __name__ == "__main__":
    main()
