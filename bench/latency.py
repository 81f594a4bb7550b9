"""L1/L8 latency benchmark; see vllm_lite/benchmarks/latency.py (same as `vllm-lite bench latency`)."""
from vllm_lite.benchmarks.latency import main

if __name__ == "__main__":
    main()
