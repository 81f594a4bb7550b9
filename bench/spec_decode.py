"""Speculative decoding benchmarks (verify / ngram / t1); see vllm_lite/benchmarks/spec.py (same as
`vllm-lite bench spec SCENARIO`)."""
import sys

from vllm_lite.benchmarks.spec import main

if __name__ == "__main__":
    main(sys.argv[1:])
