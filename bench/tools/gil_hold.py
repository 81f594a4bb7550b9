"""How long tokenizing a large prompt holds the GIL (the API server's event loop waits that long): a thread ticks
every 1 ms beside the tokenizer and the longest gap between ticks is printed, for transformers' call, the call
with ids only, and the Rust encoding's token count.

    python bench/tools/gil_hold.py --megabytes 8      # the tiny test tokenizer (tests/tiny_models.py)
    python bench/tools/gil_hold.py --tokenizer PATH
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--megabytes", type=float, default=8.0)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    from transformers import AutoTokenizer
    path = args.tokenizer
    if path is None:
        from tiny_models import make_tiny_tokenizer
        path = tempfile.mkdtemp()
        make_tiny_tokenizer(path)
    tok = AutoTokenizer.from_pretrained(path)
    prompt = "word " * int(args.megabytes * 2 ** 20 / 5)
    gaps: list[float] = []
    stop = threading.Event()

    def tick() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            time.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    ways = {"transformers call": lambda: len(tok(prompt).input_ids),
            "ids only": lambda: len(tok(prompt, return_attention_mask=False, return_token_type_ids=False).input_ids),
            "token count (Rust)": lambda: len(tok.backend_tokenizer.encode_batch([prompt])[0])}
    for name, way in ways.items():
        worst = []
        for _ in range(args.runs):
            gaps.clear()
            n = way()
            worst.append(max(gaps))
        print(f"{name:<20} {n} tokens, longest GIL hold {', '.join(f'{w:.3f}' for w in worst)} s", flush=True)
    stop.set()


if __name__ == "__main__":
    main()
