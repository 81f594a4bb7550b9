"""Socket plumbing between processes: message types, msgspec codecs (never pickle), addresses, parent-death.

Every socket carries msgspec msgpack. Each direction has a tagged union of the Structs it may carry, so the
receiver decodes into typed objects and a malformed or foreign message fails to decode instead of executing.
"""
from __future__ import annotations

import ctypes
import os
import signal
import time
from typing import Any, Union

import msgspec
import zmq

from vllm_lite.core.sched_output import ModelRunnerOutput, SchedulerOutput
from vllm_lite.engine.messages import EngineCoreOutputs, EngineCoreRequest


class AbortRequests(msgspec.Struct, array_like=True, tag=True):
    request_ids: list[str]


class EngineReady(msgspec.Struct, array_like=True, tag=True):
    num_blocks: int


class EngineDead(msgspec.Struct, array_like=True, tag=True):
    reason: str


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
CoreEvent = Union[TaggedOutputs, EngineReady, EngineDead]
WorkerInput = Union[TaggedSchedulerOutput, WorkerCall]
WorkerEvent = Union[TaggedRunnerOutput, WorkerReply]

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


def send_first(sock: Any, frame: bytes, peer: Any, what: str) -> None:
    """Send the first frame on a bound PUSH socket, waiting for the peer process to connect. A plain send would
    block forever if `peer` (a multiprocessing process) died before connecting; this raises RuntimeError then."""
    while True:
        try:
            sock.send(frame, flags=zmq.NOBLOCK)
            return
        except zmq.Again:
            if not peer.is_alive():
                raise RuntimeError(f"{what} exited before connecting (exit code {peer.exitcode})") from None
            time.sleep(0.01)
