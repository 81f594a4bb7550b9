"""T1 throughput benchmark; see vllm_lite/benchmarks/throughput.py (same as `vllm-lite bench throughput`)."""
from vllm_lite.benchmarks.throughput import main

if __name__ == "__main__":
    main()
