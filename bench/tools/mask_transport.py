"""One step's grammar mask from the engine core to a worker process, into the worker's staging buffer: inside the
SampleTokens message (msgspec encode, ZeroMQ, decode) against a shared-memory slot named by the message
(vllm_lite/shared_masks.py), the server's path since it exists. Two processes, a ZeroMQ PUSH/PULL pair each way;
the worker acknowledges once the rows are copied. Medians over --steps alternating steps.

    python bench/tools/mask_transport.py [--rows 256] [--words 1536] [--steps 500]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from ipc_peer import connect_back, spawn_peer


def _worker(addr_in: str, addr_out: str, rows: int, words: int) -> None:
    from vllm_lite.protocol import WORKER_CALL_DECODER
    from vllm_lite.shared_masks import MaskReader
    ctx, inbox, outbox = connect_back(addr_in, addr_out)
    reader, staging = MaskReader(), np.empty((rows, words), np.int32)
    while (msg := inbox.recv()) != b"stop":
        call = WORKER_CALL_DECODER.decode(msg)
        reader.attach_rows(call.grammar)
        np.copyto(staging, np.frombuffer(call.grammar.bitmask, np.int32).reshape(rows, words))
        del call
        outbox.send(b"ok")
    reader.close()
    ctx.destroy(linger=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--words", type=int, default=1536)
    ap.add_argument("--steps", type=int, default=500)
    args = ap.parse_args()
    from vllm_lite.protocol import GrammarOutput, SampleTokens, encode
    from vllm_lite.shared_masks import MaskSlots
    ctx, outbox, inbox, proc = spawn_peer(_worker, args.rows, args.words)
    slots = MaskSlots()
    filled = np.random.default_rng(0).integers(-2**31, 2**31 - 1, (args.rows, args.words)).astype(np.int32)
    req_ids = [str(i) for i in range(args.rows)]
    times: dict[str, list[tuple[float, float]]] = {"message": [], "shared memory": []}
    for step in range(args.steps + 50):
        mode = "shared memory" if step % 2 else "message"
        rows = slots.lend(args.rows, args.words) if mode == "shared memory" else filled
        if rows is not filled:
            rows[:] = filled  # the engine core's fill writes into the slot instead (not timed: it is the same work)
        grammar = slots.outgoing(GrammarOutput(req_ids, [1] * args.rows, args.words, memoryview(rows).cast("B")))
        start = time.perf_counter()
        outbox.send(encode(SampleTokens(grammar)))
        sent = time.perf_counter()
        inbox.recv()
        done = time.perf_counter()
        slots.output_received()
        if step >= 50:  # warmed up
            times[mode].append((sent - start, done - start))
    outbox.send(b"stop")
    proc.join()
    slots.close()
    ctx.destroy(linger=0)
    print(f"{args.rows} rows x {args.words} words ({args.rows * args.words * 4 / 1e6:.2f} MB), median of "
          f"{args.steps // 2} steps each")
    for mode, values in times.items():
        print(f"  {mode:14s} engine core (encode + send) {1e6 * statistics.median(a for a, _ in values):8.1f} us, "
              f"until the worker has the rows staged {1e6 * statistics.median(b for _, b in values):8.1f} us")


if __name__ == "__main__":
    main()
