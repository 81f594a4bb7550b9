"""`python -m vllm_lite ...` is the `vllm-lite` console script."""
import os
import sys

# Run from the repository root, `python -m` puts it first on sys.path, where its top-level folder kernels/ (installed
# as vllm_lite.kernels) would shadow the PyPI package `kernels` that transformers imports when it loads a model.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isfile(os.path.join(_ROOT, "pyproject.toml")):  # a source checkout, not an installed package
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]

from vllm_lite.entrypoints.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
