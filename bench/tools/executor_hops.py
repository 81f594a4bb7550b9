"""Per-step time of batch-1 decoding with the worker in the engine's process (the offline LLM) and in a worker
process over ZeroMQ (what `vllm-lite serve` runs): the served layout's extra host latency per step, the suspect for
issue 16's served ITL gap. A tiny model keeps the forward short, so the hops show.

    python bench/tools/executor_hops.py                  # CPU, 1-layer Qwen3, 128 in / 512 out, 5 runs each
    python bench/tools/executor_hops.py --device cuda    # on the GPU machine

Each layout generates output_len // 4 and output_len tokens; the difference per step excludes the prefill and
start-up. Medians of --runs runs are printed with their spread.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests"))

from tiny_models import make_tiny_model  # noqa: E402

from vllm_lite import LLM, SamplingParams  # noqa: E402
from vllm_lite.entrypoints import llm as llm_module  # noqa: E402
from vllm_lite.executor.multiproc import MultiprocExecutor  # noqa: E402


def _multiproc_llm(path: str, **kw) -> LLM:
    """An LLM whose one worker runs in its own process (the server's layout), through LLM's own set-up path."""
    original = llm_module.LLM._make_executor

    def make(self):  # noqa: ANN001
        sock_dir = tempfile.mkdtemp(prefix="vllm-lite-hops-")
        executor = MultiprocExecutor(self.config, sock_dir)
        executor.wait_model_description()
        import weakref
        weakref.finalize(self, llm_module._shutdown_workers, executor, sock_dir)
        return executor

    llm_module.LLM._make_executor = make
    try:
        return LLM(path, **kw)
    finally:
        llm_module.LLM._make_executor = original


def _per_step(llm: LLM, input_len: int, output_len: int) -> float:
    prompt = [{"prompt_token_ids": [(7 * i) % 300 + 10 for i in range(input_len)]}]
    times = []
    for n in (output_len // 4, output_len):
        t0 = time.perf_counter()
        llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True), use_tqdm=False)
        times.append(time.perf_counter() - t0)
    return (times[1] - times[0]) / (output_len - output_len // 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=512)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--layout", choices=["both", "inproc", "multiproc"], default="both")
    args = ap.parse_args()
    head_dim = 64 if args.device == "cuda" else 16  # FlashInfer's smallest; on the CPU the forward stays short
    path = make_tiny_model(tempfile.mkdtemp(), "qwen3", num_hidden_layers=1, hidden_size=2 * head_dim,
                           intermediate_size=4 * head_dim, num_attention_heads=2, num_key_value_heads=1,
                           head_dim=head_dim,
                           max_position_embeddings=args.input_len + args.output_len + 64)
    kw = dict(device=args.device, max_num_seqs=8, max_model_len=args.input_len + args.output_len + 64,
              skip_tokenizer_init=True, enable_prefix_caching=False)
    if args.device == "cpu":
        kw["dtype"] = "float32"
    results = {}
    layouts = {"inproc": ("in-process worker", lambda: LLM(path, **kw)),
               "multiproc": ("worker process", lambda: _multiproc_llm(path, **kw))}
    for key, (name, make) in layouts.items():
        if args.layout not in ("both", key):
            continue
        llm = make()
        _per_step(llm, args.input_len, 64)  # warm-up
        runs = [_per_step(llm, args.input_len, args.output_len) for _ in range(args.runs)]
        results[name] = runs
        print(f"{name:<20} {1000 * statistics.median(runs):.3f} ms per step "
              f"({1000 * min(runs):.3f}-{1000 * max(runs):.3f}, {args.runs} runs)", flush=True)
        llm.engine.shutdown()
        del llm
    if len(results) < 2:
        return
    a, b = (statistics.median(r) for r in results.values())
    print(f"worker process - in-process: {1000 * (b - a):+.3f} ms per step")


if __name__ == "__main__":
    main()
