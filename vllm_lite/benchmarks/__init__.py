"""Benchmarks (`vllm-lite bench latency|throughput`, also bench/*.py): the workloads of docs/PERF.md."""
