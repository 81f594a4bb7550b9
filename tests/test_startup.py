"""Start-up handshake without the API server on the critical path: the worker resolves the model from the config
alone and says what is wrong with it; deaths before the first message fail fast; the API server imports neither
torch nor transformers."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest

from server_utils import alive, children
from vllm_lite.config import EngineConfig
from vllm_lite.protocol import ModelDescription, ModelError


def test_api_server_imports_neither_torch_nor_transformers():
    code = ("import sys, vllm_lite.entrypoints.cli, vllm_lite.entrypoints.openai.api_server; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def _executor(model: str, tmp_path):
    from vllm_lite.executor.multiproc import MultiprocExecutor
    config = EngineConfig.from_kwargs(model=model, device="cpu", max_model_len=256)
    return MultiprocExecutor(config, str(tmp_path))


def test_worker_describes_the_model_it_resolved(tiny_llama_path, tmp_path):
    executor = _executor(tiny_llama_path, tmp_path)
    try:
        desc, frame = executor.wait_model_description()
        assert isinstance(desc, ModelDescription) and frame
        assert desc.path == os.path.abspath(tiny_llama_path) and desc.max_model_len == 256
        assert executor.determine_num_blocks() > 0  # profiled before it was asked; the answer is the same kind
    finally:
        executor.shutdown()
    assert not any(p.is_alive() for p in executor.procs)


def test_worker_reports_a_bad_model(tmp_path):
    missing = str(tmp_path / "no-config")
    os.makedirs(missing)
    executor = _executor(missing, tmp_path)
    try:
        desc, _ = executor.wait_model_description()
        assert isinstance(desc, ModelError) and "has no config.json" in desc.reason
    finally:
        executor.shutdown()


def test_worker_death_before_its_description_fails_fast(tiny_llama_path, tmp_path):
    from vllm_lite.executor.multiproc import WorkerDiedError
    executor = _executor(tiny_llama_path, tmp_path)
    try:
        executor.procs[0].kill()
        start = time.monotonic()
        with pytest.raises(WorkerDiedError, match="exited with code"):
            executor.wait_model_description()
        assert time.monotonic() - start < 10
    finally:
        executor.shutdown()


def test_model_error_reaches_an_api_server_that_binds_late(tmp_path):
    """The worker may fail before the API server has bound its sockets (it imports meanwhile): the reason still
    arrives, and the engine core is stopped."""
    from vllm_lite.engine.async_client import AsyncEngineClient, EngineStartupError
    from vllm_lite.engine.core_launch import spawn_engine_core
    missing = str(tmp_path / "no-config")
    os.makedirs(missing)
    config = EngineConfig.from_kwargs(model=missing, device="cpu")
    core = spawn_engine_core(config)
    client = AsyncEngineClient(config, core=core)
    try:
        deadline = time.monotonic() + 60
        while not children(core.proc.pid) and core.proc.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)  # the worker is spawned ...
        while children(core.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)  # ... and has failed, before anybody listens
        with pytest.raises(EngineStartupError, match="has no config.json"):
            asyncio.run(asyncio.wait_for(client.start(), 60))
    finally:
        client.shutdown()
    assert not alive(core.proc.pid)


@pytest.mark.parametrize("user_prefix", [None, "/tmp/user-pycache"])
def test_serve_keeps_bytecode_in_the_cache_folder_unless_the_user_chose(tmp_path, user_prefix):
    """Read-only site-packages recompile every module on every start; serve caches bytecode under its cache folder
    (inherited by its processes through PYTHONPYCACHEPREFIX), also where PYTHONDONTWRITEBYTECODE is set (images set
    it to keep .pyc out of their layers), unless the user set a prefix or VLLM_LITE_BYTECODE_CACHE=0."""
    code = ("import os, sys; from vllm_lite.entrypoints.cli import _use_bytecode_cache; _use_bytecode_cache(); "
            "print(sys.pycache_prefix, os.environ.get('PYTHONPYCACHEPREFIX'), sys.dont_write_bytecode, "
            "os.environ.get('PYTHONDONTWRITEBYTECODE'))")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")}
    env["XDG_CACHE_HOME"] = str(tmp_path)
    if user_prefix:
        env["PYTHONPYCACHEPREFIX"] = user_prefix
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    want = user_prefix or os.path.join(str(tmp_path), "vllm_lite", "pycache")
    assert done.stdout.split() == [want, want, "False", "None"]
    if user_prefix:
        return
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.stdout.split() == [want, want, "False", "None"]
    env["VLLM_LITE_BYTECODE_CACHE"] = "0"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.stdout.split() == ["None", "None", "True", "1"]
