"""Online serving benchmark: a thin wrapper over `vllm-lite bench serve` (vllm_lite/benchmarks/serve.py), which
measures TTFT, TPOT, ITL and end-to-end latency against any OpenAI-compatible server, or one it launches.

    python bench/serving.py --launch --model qwen3-0.6b --max-concurrency 1 --num-prompts 50
    python bench/serving.py --base-url http://127.0.0.1:8000 --dataset gsm8k --sweep 1,2,4,8,inf
"""
from __future__ import annotations

import sys

from vllm_lite.benchmarks.serve import main

if __name__ == "__main__":
    main(sys.argv[1:])
