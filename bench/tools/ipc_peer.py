"""A peer process on a ZeroMQ IPC PUSH/PULL pair, for the tools that time the engine core <-> worker hop."""
from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
from typing import Any, Callable

import zmq


def spawn_peer(target: Callable[..., None], *args: Any) -> tuple[zmq.Context, zmq.Socket, zmq.Socket, Any]:
    """Bind a PUSH (to the peer) and a PULL (from it) on fresh IPC addresses and spawn `target(to_peer_addr,
    from_peer_addr, *args)`, which connects a PULL and a PUSH to them. Returns (context, push, pull, process)."""
    where = tempfile.mkdtemp()
    to_peer, from_peer = f"ipc://{os.path.join(where, 'to')}", f"ipc://{os.path.join(where, 'from')}"
    ctx = zmq.Context()
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    push.bind(to_peer)
    pull.bind(from_peer)
    proc = mp.get_context("spawn").Process(target=target, args=(to_peer, from_peer, *args))
    proc.start()
    return ctx, push, pull, proc


def connect_back(to_peer: str, from_peer: str) -> tuple[zmq.Context, zmq.Socket, zmq.Socket]:
    """The peer's side: (context, pull from the parent, push to it)."""
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.connect(to_peer)
    push.connect(from_peer)
    return ctx, pull, push
