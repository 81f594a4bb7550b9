"""`vllm-lite bench spec` on the CPU: the scenarios end to end with tiny settings, and the verify scenario's oracle."""
from __future__ import annotations

import pytest

from vllm_lite.sampling_params import SamplingParams

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


@pytest.mark.slow
def test_spec_benchmark_scenarios_run_on_cpu(tiny_qwen3_path, tmp_path):
    """`vllm-lite bench spec verify|ngram|t1` end to end with tiny settings (the H200 runs the same code)."""
    import json

    from vllm_lite.benchmarks import spec
    cpu = ["--model", tiny_qwen3_path, "--device", "cpu", "--dtype", "float32", "--max-model-len", "256"]
    out = tmp_path / "verify.json"
    r = spec.main(["verify", *cpu, "--batch-sizes", "1,2", "--input-len", "6", "--output-len", "10",
                   "--num-iters", "1", "--json", str(out)])
    assert json.loads(out.read_text())["rows"] == r["rows"]
    for row in r["rows"]:  # the oracle replays the plain outputs: every draft accepted
        assert row["identical_outputs"] == f"{row['batch_size']}/{row['batch_size']}"
        assert row["calibration_runs"] == 1  # fp32: the spec engine's own outputs are the plain ones
        assert row["mean_acceptance_length"] == 4.0 and row["per_position_acceptance"] == [1.0, 1.0, 1.0]
        assert row["plain_tpot_ms"] > 0 and row["spec_tpot_ms"] > 0
    data = tmp_path / "gsm8k"
    data.mkdir()
    (data / "test.jsonl").write_text("\n".join(json.dumps({"question": q, "answer": "#### 1"}) for q in (
        "Tom has 3 apples and buys 4 more. How many apples does he have?",
        "A train travels 60 miles in 2 hours. What is its speed?")))
    r = spec.main(["ngram", *cpu, "--data", str(data), "--num-passages", "2", "--num-chat", "2",
                   "--output-len", "12", "--speculative-config",
                   '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}'])
    assert r["edit_identical_outputs"] == "2/2" and r["chat_identical_outputs"] == "2/2"
    assert r["edit_spec_tpot_ms"] > 0 and "mean_acceptance_length" in r["edit_acceptance"]  # random weights copy little
    from tiny_models import make_tiny_model
    wide = make_tiny_model(str(tmp_path / "wide"), "qwen3", num_hidden_layers=1, vocab_size=10000)  # T1's ids
    r = spec.main(["t1", *cpu[2:], "--model", wide, "--num-requests", "4", "--min-len", "4", "--max-len", "12"])
    assert r["plain_output_tokens_per_s"] > 0 and r["ratio"] > 0 and "acceptance" in r


def test_verify_benchmark_oracle_follows_a_memoryless_model(tiny_llama_path):
    """bench spec verify's model: with o_proj/down_proj zeroed the greedy next token depends on the current token
    alone (prompts ending alike continue alike, whatever came before), so the successor oracle learned from one
    run drafts exactly what the spec engine then accepts, every step."""
    from vllm_lite import LLM
    from vllm_lite.benchmarks.spec import SuccessorOracle, make_memoryless
    kw = dict(device="cpu", dtype="float32", max_model_len=256, load_format="dummy", skip_tokenizer_init=True)
    plain = LLM(tiny_llama_path, **kw)
    assert make_memoryless(plain) == 2 * plain.model_runner().info.hf_config.num_hidden_layers
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    prompts = [{"prompt_token_ids": [5, 9, 31, 7]}, {"prompt_token_ids": [200, 3, 7]}, {"prompt_token_ids": [11, 12]}]
    outs = [list(o.outputs[0].token_ids) for o in plain.generate(prompts, params, use_tqdm=False)]
    assert outs[0] == outs[1] != outs[2]  # both end in 7
    oracle = SuccessorOracle()
    assert oracle.learn(prompts[2]["prompt_token_ids"], outs[2]) > 0
    assert oracle.learn(prompts[2]["prompt_token_ids"], outs[2]) == 0

    class Req:
        prompt_token_ids, output_token_ids = [11, 12], outs[2][:5]
    assert oracle.propose(Req, 3) == outs[2][5:8]
    del plain
    spec = LLM(tiny_llama_path, speculative_config={**NGRAM, "num_speculative_tokens": 3}, **kw)
    make_memoryless(spec)
    spec.engine.proposer = oracle
    oracle.learn(prompts[0]["prompt_token_ids"], outs[0])
    got = [list(o.outputs[0].token_ids) for o in spec.generate(prompts, params, use_tqdm=False)]
    assert got == outs
    stats = spec.engine.scheduler.make_stats()
    assert stats.num_drafts > 0 and stats.num_accepted_tokens == stats.num_draft_tokens


def test_drafting_benchmark_profiles_a_device_proposal(tiny_llama_path, tmp_path):
    """bench/spec_drafting.py with --profile on the CPU: the step's drafting share, and the proposal body profiled
    (host ops stand in for kernels off the GPU; the H200 run reports kernels and the bandwidth floor)."""
    import importlib.util
    import json
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "bench", "spec_drafting.py")
    spec = importlib.util.spec_from_file_location("spec_drafting", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "drafting.json"
    r = mod.main(["--model", tiny_llama_path, "--device", "cpu", "--dtype", "float32", "--max-model-len", "512",
                  "--output-len", "12", "--num-iters", "1", "--profile", "--json", str(out)])
    assert json.loads(out.read_text())["drafting_ms"] == r["drafting_ms"] > 0
    assert r["device_proposals"] > 0 and 0 < r["drafting_share"] < 1
    prof = r["proposal_profile"]
    assert "error" not in prof, prof
    assert prof["kernel_ms"] > 0 and prof["head_weight_bytes"] > 0 and prof["floor_ms"] is None
    assert any("mm" in row["kernel"] for row in prof["top_kernels"])
