"""Executors: how the engine core drives its workers (in this process, or one process per rank over ZeroMQ)."""
from vllm_lite.executor.base import Executor
from vllm_lite.executor.inproc import InProcExecutor

__all__ = ["Executor", "InProcExecutor"]
