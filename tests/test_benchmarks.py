"""The benchmark entry points (`vllm-lite bench throughput|latency`) run end to end on a tiny random model on the CPU:
the GPU numbers in docs/PERF.md come from exactly this code."""
from __future__ import annotations

import json

from tiny_models import make_tiny_model

from vllm_lite.benchmarks import latency, throughput


def _tiny(tmp_path) -> str:
    # T1's prompts hold token ids up to 10000.
    return make_tiny_model(str(tmp_path), "qwen3", num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=10000,
                           max_position_embeddings=4096)


def test_throughput_reports_the_median_of_its_timed_runs(tmp_path):
    out = tmp_path / "t1.json"
    result = throughput.main(["--model", _tiny(tmp_path), "--device", "cpu", "--num-requests", "5", "--min-len", "4",
                              "--max-len", "12", "--repeats", "3", "--json", str(out)])
    runs = result["runs_elapsed_s"]
    assert len(runs) == 3 and sorted(runs)[1] == round(result["elapsed_s"], 4)
    assert 5 * 4 <= result["output_tokens"] <= 5 * 12  # ignore_eos: every request runs to its max_tokens
    assert result["output_tokens_per_s"] == result["output_tokens"] / result["elapsed_s"]
    assert json.loads(out.read_text())["runs_elapsed_s"] == runs


def test_latency_reports_tpot_and_ttft(tmp_path):
    # TPOT is (a full run - a one-token run) / (output_len - 1), from two runs: enough decode steps that a busy CI
    # machine's noise cannot outweigh them (6 tokens once gave -0.25 ms beside another job)
    result = latency.main(["--model", _tiny(tmp_path), "--device", "cpu", "--batch-size", "2", "--input-len", "8",
                           "--output-len", "48", "--num-iters-warmup", "1", "--num-iters", "3"])
    assert result["tpot_ms"] > 0 and result["ttft_ms"] > 0


def test_benchmarks_take_the_serve_engine_flags():
    """One definition of the engine flags (entrypoints/args.py): the benchmarks add theirs on top with other
    defaults, a command line means the same to both, and engine_argv (bench/serving.py) gives the flags back."""
    import argparse

    from vllm_lite.benchmarks.utils import add_bench_engine_args
    from vllm_lite.entrypoints.args import engine_argv, engine_kwargs_from_args
    from vllm_lite.entrypoints.cli import build_parser

    bench, serve = add_bench_engine_args(argparse.ArgumentParser()), build_parser()
    defaults = engine_kwargs_from_args(bench.parse_args([]))
    assert defaults.keys() == engine_kwargs_from_args(serve.parse_args(["serve"])).keys()
    assert (defaults["model"], defaults["dtype"], defaults["load_format"], defaults["max_model_len"]) == \
        ("qwen3-0.6b", "bfloat16", "dummy", 4096)
    assert defaults["max_num_seqs"] is None and not defaults["enable_prefix_caching"]  # the LLM class's batch sizes
    argv = ["--model", "m", "--dtype", "float16", "--enforce-eager", "--no-async-scheduling", "--max-num-seqs", "8",
            "--kv-cache-memory-bytes", "1G", "--attention-backend", "torch", "--enable-prefix-caching"]
    given = engine_kwargs_from_args(bench.parse_args(argv))
    served = engine_kwargs_from_args(serve.parse_args(["serve", *argv]))
    for name in ("model", "dtype", "enforce_eager", "async_scheduling", "max_num_seqs", "kv_cache_memory_bytes",
                 "attention_backend", "enable_prefix_caching"):
        assert given[name] == served[name], name
    again = engine_kwargs_from_args(serve.parse_args(["serve", *engine_argv(given)]))
    assert {k: v for k, v in given.items() if v is not None}.items() <= again.items()
