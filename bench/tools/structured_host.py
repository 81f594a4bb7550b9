"""The host's share of structured outputs at full batch, without the device: bench structured's json_schema run and
its unconstrained same-lengths run with the model's forward, lm_head and sampler replaced by stand-ins, timed by part
(StepBreakdown), so that what differs is the engine core's and the worker's Python for the grammars (matcher
advance, bitmask fill and its hand-off, mask staging), not the model. On the H200 machine a full-batch step of the
default model is host-bound, so these milliseconds are the ones that set issue 13's ratio there; here they are
measured without that machine's 1.6x swings in host speed.

The stand-in sampler takes each constrained row's lowest allowed token (from the packed mask the worker received)
and token 7 elsewhere; logits are one column wide, so applying the mask costs nothing.

    python bench/tools/structured_host.py --num-requests 256 --max-tokens 64 --fill-threads 2
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests"))

from tiny_models import make_tiny_model_with_default_tokenizer  # noqa: E402

from vllm_lite import LLM  # noqa: E402
from vllm_lite.benchmarks.step_breakdown import StepBreakdown  # noqa: E402
from vllm_lite.benchmarks.structured import run_mode, workload  # noqa: E402
from vllm_lite.sample.sampler import SamplerOutput  # noqa: E402


def stub_model(llm: LLM) -> None:
    """Forward, logits and sampler replaced: constrained rows take their lowest allowed token."""
    runner = llm.model_runner()
    hidden = torch.zeros(1 << 16, runner.info.hf_config.hidden_size)
    runner.forward = lambda input_ids, positions: hidden[: input_ids.shape[0]]
    runner.model.compute_logits = lambda h: torch.zeros(h.shape[0], 1)
    seen: dict = {}
    apply = runner.grammar_bitmask.apply

    def record(logits, grammar, req_ids, row_offsets):
        seen["grammar"], seen["req_ids"] = grammar, req_ids
        apply(logits, grammar, req_ids, row_offsets)

    runner.grammar_bitmask.apply = record

    def sample(logits, meta, logits_owned=False):
        ids = np.full(logits.shape[0], 7, dtype=np.int64)
        grammar = seen.pop("grammar", None)
        if grammar is not None:
            words = np.frombuffer(grammar.bitmask, dtype=np.int32).reshape(-1, grammar.num_words)
            col = (words != 0).argmax(axis=1)
            word = words[np.arange(len(words)), col].astype(np.int64) & 0xFFFFFFFF
            low = word & -word
            first = col * 32 + np.log2(np.maximum(low, 1)).astype(np.int64)
            where = {r: j for j, r in enumerate(seen.pop("req_ids"))}
            row = 0
            for req_id, n in zip(grammar.req_ids, grammar.rows_per_req):
                if req_id in where:
                    ids[where[req_id]] = first[row]
                row += n
        return SamplerOutput(torch.from_numpy(ids))

    runner.sampler = sample


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--fill-threads", type=int, default=2)
    ap.add_argument("--fill-switch-interval-ms", type=float, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    so_config = {"fill_threads": args.fill_threads}
    if args.fill_switch_interval_ms is not None:
        so_config["fill_switch_interval_ms"] = args.fill_switch_interval_ms
    path = make_tiny_model_with_default_tokenizer(tempfile.mkdtemp(), num_hidden_layers=1)
    llm = LLM(path, device="cpu", dtype="float32", max_model_len=1024, max_num_seqs=args.num_requests,
              max_num_batched_tokens=1 << 16, async_scheduling=True, enable_prefix_caching=False,
              structured_outputs_config=so_config)
    stub_model(llm)
    counter = StepBreakdown(llm)
    items = workload(args.num_requests)
    run_mode(llm, "json_schema", items[:16], 16, False)  # warm-up: compiles the schemas
    pairs = []
    for _ in range(args.repeats):
        run, outs = run_mode(llm, "json_schema", items, args.max_tokens, False, counter)
        same, _ = run_mode(llm, "unconstrained", items, args.max_tokens, False, counter,
                           [len(o.outputs[0].token_ids) for o in outs])
        pairs.append((run, same))
    print(f"{args.num_requests} requests, max_tokens {args.max_tokens}, fill_threads {args.fill_threads}, "
          f"{run['output_tokens']} tokens, {run['engine_steps']} steps; validity {run['validity_rate']}")
    parts = [k for k in pairs[0][0]["step_parts_ms"]]
    print(f"{'ms per step (median of ' + str(args.repeats) + ')':<26} {'json_schema':>12} {'same lengths':>13} "
          f"{'extra':>8}")
    for key in ["step_ms_mean"] + parts:
        a = statistics.median(r[key] if key == "step_ms_mean" else r["step_parts_ms"][key] for r, _ in pairs)
        b = statistics.median(s[key] if key == "step_ms_mean" else s["step_parts_ms"][key] for _, s in pairs)
        print(f"{key:<26} {a:>12.3f} {b:>13.3f} {a - b:>+8.3f}")


if __name__ == "__main__":
    main()
