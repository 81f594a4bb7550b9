"""How many kernels inductor's Triton backend would generate for a tiny model's forward (its fusion decisions),
on any machine: the Triton codegen is planned on the CPU and fails only at the end, for want of a GPU driver.

    python bench/fusion_count.py --arch qwen3

Prints the node count before/after fusion and how often inductor refused a fusion for "no shared data" (a sign
that it could not prove two buffers the same size). docs/PERF.md records the numbers.
"""
from __future__ import annotations

import argparse
import io
import logging
import os
import sys
import tempfile

import torch
import torch._inductor.config as inductor_config

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="qwen3", choices=["llama", "qwen2", "qwen3"])
    args = ap.parse_args()
    from test_compile import _load, _run
    from tiny_models import make_tiny_model

    from vllm_lite.compile import compile_model
    from vllm_lite.config import EngineConfig

    inductor_config.cpu_backend = "triton"
    tmp = tempfile.mkdtemp()
    model, ctx = _load(make_tiny_model(tmp, args.arch))
    log = io.StringIO()
    logging.getLogger("torch._inductor.scheduler").addHandler(logging.StreamHandler(log))
    torch._logging.set_logs(fusion=True)
    fwd = compile_model(model, EngineConfig(), cache_dir=os.path.join(tmp, "cache"))
    try:
        _run(fwd, model, ctx, [(0, 0, 9), (16, 0, 5)], 1)
    except Exception as e:  # noqa: BLE001 - expected without a GPU: the plan is made, the kernels cannot load
        print(f"(compilation stopped as expected without a GPU driver: {type(e).__name__})")
    text = log.getvalue()
    rounds = [line.split("completed fusion round", 1)[1].strip() for line in text.splitlines()
              if "completed fusion round" in line]
    print(f"{args.arch}, {model.config.num_hidden_layers} layers: fusion {rounds[0] if rounds else '?'}; "
          f"'no shared data' refusals: {text.count('no shared data')}")


if __name__ == "__main__":
    main()
