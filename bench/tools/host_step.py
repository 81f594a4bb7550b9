"""The host's share of a decode step: the engine with the model forward, lm_head and sampler replaced by constant
outputs, so what is timed is scheduling, input staging, attention planning and output handling (CPU, tiny model).

On the GPU the host prepares step N+1 while the device runs step N, so whenever this exceeds the device's step time
the host sets the pace (T1's small-batch tail, docs/PERF.md). Per-function times come from wrappers, not a profiler.

    python bench/tools/host_step.py --batch-size 16 --input-len 1400
    python bench/tools/host_step.py --batch-size 1 --input-len 128 --spec ngram   # a verify cycle (k = 4)

With --spec ngram the constant logits make every output token the same, so after a few steps every step verifies
the n-gram draft and accepts it (one draft: the latest earlier match of the repeated token is the one just before,
so one token follows it): the host's share of a batch-1 verification step (greedy, rejection sampler on the CPU).
"""
from __future__ import annotations

import argparse
import collections
import functools
import os
import random
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests"))

from tiny_models import make_tiny_model  # noqa: E402

from vllm_lite import LLM  # noqa: E402
from vllm_lite.sample.sampler import SamplerOutput  # noqa: E402
from vllm_lite.sampling_params import SamplingParams  # noqa: E402


def _timed(acc: collections.Counter, obj, name: str, label: str, calls: collections.Counter | None = None) -> None:
    fn = getattr(obj, name)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            acc[label] += time.perf_counter() - t0
            if calls is not None:
                calls[label] += 1
    setattr(obj, name, wrapper)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=1400)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--spec", choices=["none", "ngram"], default="none", help="ngram: k = 4 drafts, greedy")
    args = ap.parse_args()
    # the fixed verify-cost estimate (the default): measured costs would see the low acceptance and stop verifying
    spec = {"speculative_config": {"method": "ngram", "num_speculative_tokens": 4}
            } if args.spec == "ngram" else {}
    path = make_tiny_model(tempfile.mkdtemp(), "qwen3", num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                           max_position_embeddings=args.input_len + args.output_len + 64)
    llm = LLM(path, device="cpu", max_num_seqs=max(args.batch_size, 8), enable_prefix_caching=False,
              max_model_len=args.input_len + args.output_len + 64, skip_tokenizer_init=True, **spec)
    engine = llm.engine
    runner = llm.model_runner()
    hidden = torch.zeros(max(8192, args.batch_size), 32)
    rows = 5 * args.batch_size  # 1 + k logits rows per request when verifying
    logits = torch.randn(1, 384).repeat(rows, 1)  # one row repeated: greedy picks the same token every time
    ids = torch.full((rows,), 7, dtype=torch.int64)
    runner.forward = lambda input_ids, positions: hidden[: input_ids.shape[0]]
    runner.model.compute_logits = lambda h: logits[: h.shape[0]]
    runner.sampler = lambda lg, meta, logits_owned=False: SamplerOutput(ids[: lg.shape[0]].clone())
    acc: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    for obj, name, label in ((engine, "step", "engine.step (all)"),
                             (engine.scheduler, "schedule", "scheduler.schedule"),
                             (engine.scheduler, "update_from_output", "scheduler.update_from_output"),
                             (runner, "execute_model", "runner.execute_model"),
                             (runner, "get_output", "runner.get_output"),
                             (runner.stager, "stage", "  input staging"),
                             (runner.attn_ctx.backend, "prepare", "  attention prepare"),
                             (llm.processor, "process_outputs", "output processing"),
                             (runner, "sample_tokens", "runner.sample_tokens"),
                             *(((engine, "_propose", "engine._propose"),) if spec else ())):
        _timed(acc, obj, name, label, calls)
    random.seed(0)
    prompts = [{"prompt_token_ids": [random.randrange(300) for _ in range(args.input_len)]}
               for _ in range(args.batch_size)]
    times = []
    temperature = 0.0 if spec else 1.0
    for n in (args.output_len // 4, args.output_len):  # the difference excludes the prefill steps
        acc.clear()
        calls.clear()
        t0 = time.perf_counter()
        llm.generate(prompts, SamplingParams(temperature=temperature, max_tokens=n, ignore_eos=True), use_tqdm=False)
        times.append((time.perf_counter() - t0, dict(acc), calls["engine.step (all)"]))
    (t_short, a_short, s_short), (t_long, a_long, s_long) = times
    steps = s_long - s_short
    tokens = args.output_len - args.output_len // 4
    print(f"batch {args.batch_size}, {args.input_len}-token prompts{', n-gram k=4' if spec else ''}: host "
          f"{'decode' if not spec else 'engine'} step {(t_long - t_short) / steps * 1000:.3f} ms "
          f"({tokens / steps:.2f} tokens per request-step: {(t_long - t_short) / tokens * 1000:.3f} ms per token)")
    for label in sorted(a_long, key=lambda k: -a_long[k]):
        print(f"  {label:<34} {(a_long[label] - a_short.get(label, 0.0)) / steps * 1000:.3f} ms")


if __name__ == "__main__":
    main()
