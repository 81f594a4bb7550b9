"""Shared fixtures: tiny random HF model folders (llama / qwen2 / qwen3), built once per session.

Each fixture returns a str path to a folder with config.json, model.safetensors, generation_config.json and a
tokenizer (byte-level BPE, ChatML chat template, eos <|im_end|>), so `LLM(model=path)` works end to end.
`tiny_model_factory(arch, **config_overrides)` builds a fresh variant in a new temp dir.
"""
from __future__ import annotations

import os
import shlex
import sys

import pytest

# `python -m pytest` puts the working directory (the repository root) on sys.path, where the top-level folder kernels/
# (installed as vllm_lite.kernels) shadows the PyPI package `kernels` that transformers >= 5 imports for its hub
# kernels when it loads a model. The packages are imported through their install, never from the root.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]
sys.path.insert(0, os.path.dirname(__file__))

import server_utils  # noqa: E402
from tiny_models import make_tiny_model, make_tiny_model_with_default_tokenizer  # noqa: E402


def pytest_addoption(parser) -> None:
    parser.addoption("--server-args", default="", help="flags added to every `vllm-lite serve` the tests start "
                     "with a model (e.g. \"--tensor-parallel-size 2\": the server tests against tensor parallelism)")
    parser.addoption("--default-model-server-args", default="", help="flags added to every `vllm-lite serve` of the "
                     "default model the tests start (e.g. a --speculative-config)")


def pytest_configure(config) -> None:
    server_utils.EXTRA_ARGS[:] = shlex.split(config.getoption("--server-args"))
    server_utils.DEFAULT_MODEL_EXTRA_ARGS[:] = shlex.split(config.getoption("--default-model-server-args"))


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("models"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2_path(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("models"), "qwen2")


@pytest.fixture(scope="session")
def tiny_qwen3_path(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("models"), "qwen3")


@pytest.fixture(params=["llama", "qwen2", "qwen3"])
def tiny_model_path(request, tmp_path_factory) -> str:
    """Parametrised over the three architectures (session-built folders)."""
    return request.getfixturevalue(f"tiny_{request.param}_path")


@pytest.fixture
def tiny_model_factory(tmp_path_factory):
    """factory(arch="llama", **config_overrides) -> str path of a freshly built tiny model folder."""
    def factory(arch: str = "llama", **overrides) -> str:
        return make_tiny_model(tmp_path_factory.mktemp(f"tiny-{arch}"), arch, **overrides)
    return factory


@pytest.fixture(scope="session")
def tiny_smol_path(tmp_path_factory) -> str:
    """A random tiny Llama over the default model's vocabulary and tokenizer (SmolLM2, EOS <|im_end|> = 2); skipped
    where the default model's package is not installed."""
    try:
        return make_tiny_model_with_default_tokenizer(tmp_path_factory.mktemp("smol"))
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
