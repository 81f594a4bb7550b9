"""Drafting cost of an in-worker drafter (issue 14, benchmark 2): an EAGLE-3 head with random weights on
llama-3.1-8b (dummy weights), k = 3, batch 1: the time the drafter holds the step (its catch-up forward and k - 1
decode forwards, host work included) as a share of the whole step. Target: <= 10 % (vLLM's measured 15-18 %).

    python bench/spec_drafting.py                                   # H200: llama-3.1-8b + random EAGLE-3 head
    python bench/spec_drafting.py --model PATH --device cpu --dtype float32 --output-len 16   # a quick CPU check
    python bench/spec_drafting.py --profile        # also: where a device proposal's time goes (see profile_proposal)

The head is a config-only folder written here (hidden size, heads and vocabulary of the target, draft vocabulary
32000, layers 2, L/2, L-3) and gets random weights like the target (--load-format dummy); --head PATH uses a real
one (then --load-format auto). Random heads are rarely accepted, so each step verifies k drafts and keeps one token:
the step is the 1 + k verification plus the drafting. The host path's drafting is measured from the moment the step's
tokens are on the host (the device is idle then) to the drafts being ready on the device; a proposal on the device
(uniform verification steps, spec_decode/padded_proposal.py) by the device time between CUDA events around it.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from typing import Any

import torch

from vllm_lite.benchmarks.utils import (add_bench_engine_args, bench_model, make_llm, progress, report,
                                       resolve_bench_model)
from vllm_lite.sampling_params import SamplingParams


def write_eagle3_config(target: str, folder: str, draft_vocab: int = 32000) -> str:
    """A config-only EAGLE-3 head for `target` (its sizes, one midlayer, the usual low/mid/high layers)."""
    with open(os.path.join(resolve_bench_model(target), "config.json")) as f:
        t = json.load(f)
    layers = t["num_hidden_layers"]
    cfg = {k: t[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                             "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_theta", "hidden_act")
           if k in t}
    cfg.update(architectures=["LlamaForCausalLMEagle3"], model_type="llama", num_hidden_layers=1,
               draft_vocab_size=min(draft_vocab, t["vocab_size"]), target_hidden_size=t["hidden_size"],
               rope_scaling=t.get("rope_scaling"), tie_word_embeddings=False,
               eagle_config={"eagle_aux_hidden_state_layer_ids": [min(2, layers - 1), layers // 2,
                                                                 max(layers - 3, 0)]})
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    return folder


def profile_proposal(drafter: Any, k: int, iters: int = 20) -> dict:
    """Where a device proposal's time goes: its body (catch-up over the k + 1 rows, then k - 1 decodes) run eagerly
    under torch.profiler on the last step's inputs (the graph replays the same kernels without the launch gaps), the
    top kernels by device time, and the floor: the head's weights (embeddings excepted: a lookup reads k rows) read
    once per forward at the measured copy bandwidth. On the CPU (a check of this code) host ops stand in."""
    from torch.profiler import ProfilerActivity, profile

    from vllm_lite.benchmarks.utils import copy_bandwidth
    padded, dev = drafter.padded, drafter.device
    cuda = dev.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)

    for _ in range(3):
        padded._body(1, False, k + 1)
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        padded._body(1, False, k + 1)
    sync()
    eager_ms = 1000 * (time.perf_counter() - t0) / iters
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            padded._body(1, False, k + 1)
        sync()
    avgs = prof.key_averages()
    attr = "self_cpu_time_total" if not cuda else (
        "self_device_time_total" if hasattr(avgs[0], "self_device_time_total") else "self_cuda_time_total")
    kernels = sorted((a for a in avgs if getattr(a, attr) > 0), key=lambda a: -getattr(a, attr))
    device_ms = sum(getattr(a, attr) for a in kernels) / 1000 / iters
    wbytes = sum(p.numel() * p.element_size() for n, p in drafter.model.named_parameters() if "embed" not in n)
    bw = copy_bandwidth(dev)
    floor_ms = 1000 * k * wbytes / bw if bw else None
    top = [{"kernel": a.key[:70], "calls_per_proposal": round(a.count / iters, 1),
            "ms_per_proposal": round(getattr(a, attr) / 1000 / iters, 4)} for a in kernels[:12]]
    floor = f"floor {floor_ms:.3f} ms at {bw / 1e12:.2f} TB/s" if bw else "no floor off the GPU"
    progress(f"proposal, eager: {eager_ms:.3f} ms wall, {device_ms:.3f} ms of kernels; weights {wbytes / 1e6:.1f} MB x "
             f"{k} forwards, {floor}")
    for row in top:
        progress(f"  {row['ms_per_proposal']:.4f} ms  x{row['calls_per_proposal']:<5} {row['kernel']}")
    return {"eager_wall_ms": round(eager_ms, 4), "kernel_ms": round(device_ms, 4), "head_weight_bytes": wbytes,
            "copy_bandwidth_TBps": round(bw / 1e12, 3) if bw else None,
            "floor_ms": round(floor_ms, 4) if floor_ms else None, "top_kernels": top}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_engine_args(ap, "llama-3.1-8b")
    ap.add_argument("--method", choices=["eagle3", "eagle", "draft_model"], default="eagle3")
    ap.add_argument("--head", help="drafter folder (default: a random EAGLE-3 head of the target's sizes)")
    ap.add_argument("--num-speculative-tokens", "-k", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--num-iters", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="profile one device proposal (profile_proposal)")
    args = ap.parse_args(argv)
    if args.max_num_seqs is None:
        args.max_num_seqs = max(8, args.batch_size)  # few CUDA graph sizes to capture
    head = args.head or write_eagle3_config(bench_model(args), tempfile.mkdtemp(prefix="eagle3-head-"))
    # Every step verifies k drafts, however few are accepted (the adaptive rule would stop drafting for a random
    # head; the drafter's cost is what is measured).
    spec = {"method": args.method, "model": head, "num_speculative_tokens": args.num_speculative_tokens,
            "adaptive_draft_length": False}
    llm = make_llm(args, speculative_config=spec)
    runner = llm.model_runner()
    drafter = runner.drafting.drafter
    draft_times: list[float] = []
    propose = drafter.propose

    def timed_propose(batch):
        t0 = time.perf_counter()
        out = propose(batch)
        if drafter.device.type == "cuda":
            torch.cuda.synchronize(drafter.device)
        draft_times.append(time.perf_counter() - t0)
        return out

    drafter.propose = timed_propose
    # A uniform verification step's proposal runs on the device, queued right behind the verification without a
    # wait (spec_decode/padded_proposal.py): its cost is the device time between events around it.
    padded = getattr(drafter, "padded", None)
    padded_events: list[tuple] = []  # (start, end): CUDA events, or perf_counter times elsewhere
    if padded is not None:
        padded_propose = padded.propose
        cuda = drafter.device.type == "cuda"

        def timed_padded(*a, **kw):
            start = torch.cuda.Event(enable_timing=True) if cuda else time.perf_counter()
            if cuda:
                start.record()
            out = padded_propose(*a, **kw)
            end = torch.cuda.Event(enable_timing=True) if cuda else time.perf_counter()
            if cuda:
                end.record()
            padded_events.append((start, end))
            return out

        padded.propose = timed_padded
    rng = random.Random(0)
    vocab = llm.info.vocab_size
    prompts = [{"prompt_token_ids": [rng.randrange(min(10000, vocab)) for _ in range(args.input_len)]}
               for _ in range(args.batch_size)]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    progress("warm-up")
    llm.generate(prompts, params, use_tqdm=False)
    runs = []
    for i in range(args.num_iters):
        draft_times.clear()
        padded_events.clear()
        launches = runner._launches
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - t0
        steps = runner._launches - launches
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        step_ms = 1000 * wall / max(steps, 1)  # means over the run (the prefill step is 1 of output_len)
        if padded_events and drafter.device.type == "cuda":
            torch.cuda.synchronize(drafter.device)
            times = draft_times + [s.elapsed_time(e) / 1000 for s, e in padded_events]
        else:
            times = draft_times + [e - s for s, e in padded_events]
        draft_ms = 1000 * sum(times) / max(len(times), 1)
        runs.append({"step_ms": step_ms, "draft_ms": draft_ms, "steps": steps, "tokens": tokens,
                     "device_proposals": len(padded_events), "host_proposals": len(draft_times)})
        progress(f"run {i + 1}/{args.num_iters}: {steps} steps, {tokens} tokens, step {step_ms:.3f} ms, "
                 f"drafting {draft_ms:.3f} ms ({100 * draft_ms / step_ms:.1f} %; {len(padded_events)} proposals on "
                 f"the device, {len(draft_times)} on the host path)")
    step_ms = statistics.median(r["step_ms"] for r in runs)
    draft_ms = statistics.median(r["draft_ms"] for r in runs)
    stats = llm.engine.scheduler.make_stats()
    result = {"benchmark": "spec_drafting", "method": args.method, "model": bench_model(args),
              "head": args.head or "random EAGLE-3 (dummy)", "device": str(llm.device),
              "k": args.num_speculative_tokens, "batch_size": args.batch_size, "step_ms": step_ms,
              "drafting_ms": draft_ms, "drafting_share": draft_ms / step_ms,
              "tokens_per_step": statistics.median(r["tokens"] / r["steps"] for r in runs),
              "acceptance_rate": stats.num_accepted_tokens / max(stats.num_draft_tokens, 1),
              "device_proposals": runs[-1]["device_proposals"], "host_proposals": runs[-1]["host_proposals"],
              "target_share": 0.10}
    if args.profile and padded is not None:
        try:  # a diagnostic: the measurement above is reported whatever happens here
            result["proposal_profile"] = profile_proposal(drafter, args.num_speculative_tokens)
        except Exception as exc:  # noqa: BLE001
            result["proposal_profile"] = {"error": f"{type(exc).__name__}: {exc}"}
    print(f"drafting {draft_ms:.3f} ms of a {step_ms:.3f} ms step: {100 * draft_ms / step_ms:.1f} % "
          f"(target <= 10 %)", file=sys.stderr)
    return report(result, args.json)


if __name__ == "__main__":
    main()
