"""Round-trip latency of a ZeroMQ IPC PUSH/PULL pair between two Python processes (the engine core <-> worker hop),
with a blocking receive and with a spinning one.

    python bench/tools/zmq_pingpong.py
"""
from __future__ import annotations

import time

import zmq
from ipc_peer import connect_back, spawn_peer


def _echo(a: str, b: str) -> None:
    _, pull, push = connect_back(a, b)
    while (msg := pull.recv()) != b"q":
        push.send(msg)


def main() -> None:
    _, push, pull, proc = spawn_peer(_echo)
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
