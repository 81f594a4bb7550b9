"""Host time per engine step with the model replaced by a no-op: scheduler, input staging, sampling, output handling.

What is left when the forward costs nothing is the per-step host work that async scheduling must hide behind the
GPU (or that bounds the step time when it cannot). Runs on any machine (CPU is fine):

    python bench/tools/host_overhead.py --batch-sizes 1 8 64 256 --steps 200
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import tempfile
import time

import torch


def _tiny_config_dir(path: str) -> str:
    from transformers import Qwen3Config
    cfg = Qwen3Config(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096)
    cfg.architectures = ["Qwen3ForCausalLM"]
    cfg.save_pretrained(path)
    return path


def measure(batch_size: int, steps: int, async_scheduling: bool, model_dir: str, profile: bool = False) -> float:
    from vllm_lite import LLM, SamplingParams
    llm = LLM(model_dir, device="cpu", dtype="float32", load_format="dummy", skip_tokenizer_init=True,
              max_model_len=4096, max_num_seqs=max(batch_size, 1), enable_prefix_caching=False,
              num_gpu_blocks_override=batch_size * (steps + 64) // 16 + 4096 // 16 + 64,
              async_scheduling=async_scheduling)
    runner = llm.model_runner()
    hidden, vocab = runner.info.hf_config.hidden_size, runner.vocab_size
    runner.forward = lambda ids, pos: torch.zeros(ids.shape[0], hidden)
    runner.model.compute_logits = lambda h: torch.zeros(h.shape[0], vocab)
    rng = random.Random(0)
    batch = [{"prompt_token_ids": [rng.randrange(vocab) for _ in range(16)]} for _ in range(batch_size)]
    params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
    llm.generate(batch, params, use_tqdm=False)
    t0 = time.perf_counter()
    llm.generate(batch, params, use_tqdm=False)
    seconds = (time.perf_counter() - t0) / steps
    if profile:
        prof = cProfile.Profile()
        prof.enable()
        llm.generate(batch, params, use_tqdm=False)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64, 256])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--no-async-scheduling", action="store_true")
    ap.add_argument("--profile", action="store_true", help="cProfile the largest batch size")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = _tiny_config_dir(tmp)
        print(f"{'batch':>6} {'us/step':>9} {'us/request-step':>16}")
        for bs in args.batch_sizes:
            prof = args.profile and bs == max(args.batch_sizes)
            sec = measure(bs, args.steps, not args.no_async_scheduling, model_dir, prof)
            print(f"{bs:>6} {sec * 1e6:>9.0f} {sec * 1e6 / bs:>16.1f}", flush=True)


if __name__ == "__main__":
    main()
