"""Round-trip latency of a ZeroMQ IPC PUSH/PULL pair between two Python processes (the engine core <-> worker hop),
with a blocking receive and with a spinning one.

    python bench/tools/zmq_pingpong.py
"""
from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import time

import zmq


def _echo(a: str, b: str) -> None:
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.connect(a)
    push.connect(b)
    while (msg := pull.recv()) != b"q":
        push.send(msg)


def main() -> None:
    d = tempfile.mkdtemp()
    a, b = f"ipc://{os.path.join(d, 'a')}", f"ipc://{os.path.join(d, 'b')}"
    ctx = zmq.Context()
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    push.bind(a)
    pull.bind(b)
    proc = mp.get_context("spawn").Process(target=_echo, args=(a, b))
    proc.start()
    msg = b"x" * 300
    for mode in ("blocking", "spinning"):
        times = []
        for _ in range(3000):
            t0 = time.perf_counter()
            push.send(msg)
            if mode == "blocking":
                pull.recv()
            else:
                while True:
                    try:
                        pull.recv(zmq.NOBLOCK)
                        break
                    except zmq.Again:
                        pass
            times.append(time.perf_counter() - t0)
        times.sort()
        p50, p90 = times[len(times) // 2], times[int(len(times) * 0.9)]
        print(f"{mode}: round trip p50 {p50 * 1e6:.1f} us, p90 {p90 * 1e6:.1f} us")
    push.send(b"q")
    proc.join()


if __name__ == "__main__":
    main()
