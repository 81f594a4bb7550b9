"""IPC helpers: the first frame to a process that has not connected yet must not block forever if it died."""
from __future__ import annotations

import multiprocessing as mp
import sys
import time

import pytest
import zmq

from vllm_lite.engine.ipc import ipc_address, send_first


def _exit_at_once() -> None:
    sys.exit(3)


def _receive_one(addr: str, conn) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.connect(addr)
    conn.send(sock.recv())
    ctx.destroy()


def test_send_first_to_dead_peer_raises(tmp_path):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.bind(ipc_address(str(tmp_path), "dead"))
    peer = mp.get_context("spawn").Process(target=_exit_at_once)
    peer.start()
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="worker process exited before connecting"):
        send_first(sock, b"info", peer, "worker process")
    assert time.monotonic() - start < 30
    ctx.destroy(linger=0)


def test_send_first_reaches_a_peer_that_connects_later(tmp_path):
    addr = ipc_address(str(tmp_path), "live")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.bind(addr)
    mine, theirs = mp.get_context("spawn").Pipe()
    peer = mp.get_context("spawn").Process(target=_receive_one, args=(addr, theirs))
    peer.start()
    send_first(sock, b"info", peer, "worker process")
    assert mine.poll(30) and mine.recv() == b"info"
    peer.join(10)
    ctx.destroy(linger=0)
