"""Socket plumbing between processes: message types, msgspec codecs (never pickle), addresses, parent-death.

Every socket carries msgspec msgpack. Each direction has a tagged union of the Structs it may carry, so the
receiver decodes into typed objects and a malformed or foreign message fails to decode instead of executing.

Start-up handshake: the worker resolves the model (nobody waits for the API server's imports) and sends a
`ModelDescription` (or a `ModelError`) as its first message; the engine core passes the same frame on to the API
server, then waits for the worker's "ready". This module stays light (no torch, no transformers): the API server
imports it.
"""
from __future__ import annotations

import ctypes
import os
import signal
from typing import TYPE_CHECKING, Any, Union

import msgspec

from vllm_lite.core.sched_output import ModelRunnerOutput, SchedulerOutput
from vllm_lite.engine.messages import EngineCoreOutputs, EngineCoreRequest

if TYPE_CHECKING:
    from vllm_lite.model_loader import ModelInfo


class AbortRequests(msgspec.Struct, array_like=True, tag=True):
    request_ids: list[str]


class EngineReady(msgspec.Struct, array_like=True, tag=True):
    num_blocks: int


class EngineDead(msgspec.Struct, array_like=True, tag=True):
    reason: str


class ModelDescription(msgspec.Struct, array_like=True, tag=True):
    """A resolved model, as it travels: ModelInfo without the transformers config object (the receiver re-reads
    `path`/config.json when it needs it) and with the dtype by name. Field names match ModelInfo's, so the API
    server uses it where it used a ModelInfo."""
    model: str
    path: str
    architecture: str
    tokenizer: str
    dtype: str  # torch dtype name, e.g. "bfloat16"
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    load_format: str
    gguf_file: str | None
    vocab_size: int


class ModelError(msgspec.Struct, array_like=True, tag=True):
    """Sent instead of a ModelDescription: why the model cannot be served ("ValueError: model ... has no
    config.json"), for the API server to print as it is."""
    reason: str


def describe_model(info: ModelInfo) -> ModelDescription:
    return ModelDescription(info.model, info.path, info.architecture, info.tokenizer,
                            str(info.dtype).removeprefix("torch."), info.max_model_len, tuple(info.eos_token_ids),
                            info.load_format, info.gguf_file, info.vocab_size)


def model_info_from(desc: ModelDescription) -> ModelInfo:
    """The ModelInfo a description was made from; its hf_config reads config.json from the resolved folder on
    first use (the engine core does not use it today)."""
    import torch

    from vllm_lite.model_loader import ModelInfo
    return ModelInfo(model=desc.model, path=desc.path, hf_config=_ConfigOnDemand(desc.path),
                     architecture=desc.architecture, tokenizer=desc.tokenizer, dtype=getattr(torch, desc.dtype),
                     max_model_len=desc.max_model_len, eos_token_ids=tuple(desc.eos_token_ids),
                     load_format=desc.load_format, gguf_file=desc.gguf_file, vocab_size=desc.vocab_size)


class _ConfigOnDemand:
    """Stands in for the model's config: loads `path`/config.json (without transformers) at the first attribute
    read."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._config: Any = None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # private and dunder lookups (copy, pickle) never load the config
            raise AttributeError(name)
        if self._config is None:
            from vllm_lite.model_loader.hf_config import load_hf_config
            self._config = load_hf_config(self._path)
        return getattr(self._config, name)


class WorkerCall(msgspec.Struct, array_like=True, tag=True):
    """A control call from the engine core to a worker (load, size and allocate the KV cache, shut down)."""
    method: str
    args: list[Any] = []


class WorkerReply(msgspec.Struct, array_like=True, tag=True):
    result: Any = None
    error: str | None = None


class TaggedRequest(EngineCoreRequest, tag=True):
    """EngineCoreRequest as it travels on the input socket (tagged so it can share it with aborts)."""


class TaggedOutputs(EngineCoreOutputs, tag=True):
    pass


class TaggedSchedulerOutput(SchedulerOutput, tag=True):
    pass


class TaggedRunnerOutput(ModelRunnerOutput, tag=True):
    pass


CoreInput = Union[TaggedRequest, AbortRequests]
CoreEvent = Union[TaggedOutputs, ModelDescription, ModelError, EngineReady, EngineDead]
WorkerInput = Union[TaggedSchedulerOutput, WorkerCall]
WorkerEvent = Union[TaggedRunnerOutput, ModelDescription, ModelError, WorkerReply]

CORE_INPUT_DECODER = msgspec.msgpack.Decoder(CoreInput)
CORE_EVENT_DECODER = msgspec.msgpack.Decoder(CoreEvent)
WORKER_INPUT_DECODER = msgspec.msgpack.Decoder(WorkerInput)
WORKER_EVENT_DECODER = msgspec.msgpack.Decoder(WorkerEvent)
_ENCODER = msgspec.msgpack.Encoder()

_TAGGED = {
    EngineCoreRequest: TaggedRequest, EngineCoreOutputs: TaggedOutputs,
    SchedulerOutput: TaggedSchedulerOutput, ModelRunnerOutput: TaggedRunnerOutput,
}


def encode(msg: msgspec.Struct) -> bytes:
    """Encode a message, tagging the plain engine Structs (their fields are identical to the tagged ones)."""
    tagged = _TAGGED.get(type(msg))
    if tagged is not None:
        msg = tagged(*(getattr(msg, f) for f in msg.__struct_fields__))
    return _ENCODER.encode(msg)


def ipc_address(directory: str, name: str) -> str:
    return f"ipc://{os.path.join(directory, name)}.sock"


def die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent dies, so a killed server leaves no orphans."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
