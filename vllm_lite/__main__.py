"""`python -m vllm_lite ...` is the `vllm-lite` console script."""
import sys

from vllm_lite.entrypoints.cli import main

if __name__ == "__main__":
    sys.exit(main())
