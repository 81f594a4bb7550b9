"""The structured-output benchmark (issue 13) on a tiny random model with the default model's tokenizer: the
unconstrained same-lengths runs do the constrained runs' work token for token, the per-mode bitmask statistics and
the fill replay are reported; and the automatic defaults of fill_threads and defer_fill."""
from __future__ import annotations

import json
import os

import pytest

from vllm_lite.benchmarks import structured as bench
from vllm_lite.benchmarks.step_breakdown import StepBreakdown
from vllm_lite.config import StructuredOutputsConfig, auto_defer_fill, auto_fill_threads

def test_bench_repeats_pairs_and_reports_their_median(tiny_smol_path, monkeypatch):
    """--repeats: the constrained full-batch run and its same-lengths run again, each pair's ratio and step times,
    their median; at batch 1 two more rounds alternate constrained and same-length unconstrained requests. With
    deferred fills, their phases (wait for the thread, advance, fill)."""
    import vllm_lite.structured_output.manager as manager_module
    monkeypatch.setattr(manager_module, "BATCH_FILL_MIN_ROWS", 2)  # the full batch's fills are deferred
    result = bench.main(["--model", tiny_smol_path, "--device", "cpu", "--dtype", "float32", "--max-model-len", "1024",
                         "--num-requests", "4", "--batch1-requests", "1", "--max-tokens", "12", "--modes",
                         "json_schema", "--repeats", "3", "--structured-outputs-config", '{"defer_fill": true}'])
    assert result["defer_fill"] is True
    run = result["full_batch"]["json_schema"]
    phases = run["deferred_fill_ms_p50"]
    assert list(phases) == ["to_thread", "advance", "fill"] and all(v >= 0 for v in phases.values())
    assert 0 < run["step_parts_ms"]["fill_submit"] <= run["step_parts_ms"]["bitmask"]  # the hand-off, timed alone
    assert "deferred_fill_ms_p50" not in result["batch1"]["json_schema"]  # one row: filled in line
    ratios = run["ratio_repeats"]
    assert len(ratios) == len(run["step_ms_repeats"]) == 3 and ratios[0] == run["vs_unconstrained_same_lengths"]
    assert all(r > 0 for r in ratios) and all(a > 0 and b > 0 for a, b in run["step_ms_repeats"])
    assert run["vs_unconstrained_same_lengths_median"] == sorted(ratios)[1]
    one = result["batch1"]["json_schema"]
    rounds = one["ratio_repeats"]
    assert len(rounds) == 3 and rounds[0] == one["vs_unconstrained_same_lengths"] and all(r > 0 for r in rounds)
    assert one["vs_unconstrained_same_lengths_median"] == sorted(rounds)[1]


def test_bench_reports_same_length_ratios_and_fill_stats(tiny_smol_path, tmp_path):
    out = tmp_path / "structured.json"
    result = bench.main(["--model", tiny_smol_path, "--device", "cpu", "--dtype", "float32", "--max-model-len", "1024",
                         "--num-requests", "8", "--batch1-requests", "2", "--max-tokens", "24",
                         "--json", str(out)])
    assert json.loads(out.read_text())["fill_threads"] == result["fill_threads"] == auto_fill_threads()
    for batch, n in (("full_batch", 8), ("batch1", 2)):
        runs = result[batch]
        for mode in ("json_object", "json_schema"):
            run, same = runs[mode], runs[mode]["unconstrained_same_lengths"]
            assert same["requests"] == n and "lengths_mismatch" not in same
            assert same["output_tokens"] == run["output_tokens"] > 0
            assert run["vs_unconstrained_same_lengths"] == pytest.approx(
                run["output_tokens_per_s"] / same["output_tokens_per_s"], rel=1e-3)
            assert run["bitmask_steps"] >= run["output_tokens"] // n
            assert 0 < run["bitmask_ms_p50"] <= run["bitmask_ms_p99"]
            assert run["engine_steps"] > 0 and same["engine_steps"] > 0
            parts = run["step_parts_ms"]
            assert parts["bitmask"] > same["step_parts_ms"]["bitmask"] >= 0  # the fill shows where it runs
            assert parts["execute_model"] > 0 and parts["get_output"] >= 0
            # the two waits are timed inside their parts: on the CPU no event to wait for, no deferred fill (1 thread)
            assert 0 <= parts["inputs_wait"] <= parts["execute_model"] and parts["fill_wait"] == 0
            # the constrained path's pieces, inside their parts; none in the same-lengths run
            assert 0 < parts["mask_buffer"] <= parts["bitmask"] and parts["fill_submit"] == 0
            assert 0 < parts["mask_apply"] <= parts["sample_tokens"]
            assert all(same["step_parts_ms"][k] == 0 for k in ("mask_buffer", "fill_submit", "mask_apply"))
            inside = sum(parts[k] for k in ("schedule", "execute_model", "bitmask", "sample_tokens", "get_output",
                                            "update_from_output", "other_in_step"))
            assert inside == pytest.approx(parts["in_step"], abs=1e-3)
            assert parts["in_step"] + parts["outside_step"] == pytest.approx(run["step_ms_mean"], rel=0.05)
            assert set(run["step_parts_overhead_ms"]) == set(parts)
        assert "bitmask_ms_p50" not in runs["unconstrained"]
    for mode in ("json_object", "json_schema"):
        replay = result["fill_replay"][mode]
        assert replay["fills"] >= 1 and replay["rows_max"] == 8
        assert 0 < replay["threads_1_ms_p50"] <= replay["threads_1_ms_p99"]
        assert replay["loop_ms_p50"] > 0 and replay["tobytes_ms_p50"] > 0
    assert "vs_unconstrained_same_lengths" in result["targets"]["ratio"]


def test_same_lengths_run_forces_each_requests_length(tiny_smol_path):
    from vllm_lite import LLM
    llm = LLM(tiny_smol_path, device="cpu", dtype="float32", max_model_len=1024, kv_cache_memory_bytes=64 << 20)
    items = bench.workload(3)
    lengths = [1, 7, 13]
    run, outs = bench.run_mode(llm, "unconstrained", items, 64, False, StepBreakdown(llm), lengths)
    assert [len(o.outputs[0].token_ids) for o in outs] == lengths and run["output_tokens"] == sum(lengths)
    assert [o.outputs[0].finish_reason for o in outs] == ["length"] * 3 and "lengths_mismatch" not in run
    assert run["engine_steps"] >= max(lengths) and run["step_parts_ms"]["execute_model"] > 0


@pytest.mark.parametrize("cpus, threads", [(1, 1), (2, 1), (3, 1), (4, 2), (8, 4), (16, 4), (128, 4)])
def test_fill_threads_and_deferral_auto_defaults(monkeypatch, cpus, threads):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    assert StructuredOutputsConfig().fill_threads == threads == auto_fill_threads()
    assert StructuredOutputsConfig(fill_threads=3).fill_threads == 3
    assert StructuredOutputsConfig.from_any({"fill_threads": 0}).fill_threads == threads
    with pytest.raises(ValueError, match="fill_threads"):
        StructuredOutputsConfig(fill_threads=-1)
    assert StructuredOutputsConfig().defer_fill == (cpus >= 4) == auto_defer_fill()  # as fill_threads >= 2 did
    assert StructuredOutputsConfig(defer_fill=False).defer_fill is False
    assert StructuredOutputsConfig.from_any({"defer_fill": True, "fill_threads": 1}).defer_fill is True
    with pytest.raises(ValueError, match="defer_fill"):
        StructuredOutputsConfig(defer_fill="yes")


def test_bench_profile_names_where_the_constrained_run_spends_more(tiny_smol_path):
    """--profile: json_schema's full-batch run and its same-lengths unconstrained run under cProfile, per-step own
    times compared; the grammar's work (matchers, bitmask) shows among the functions that grew."""
    result = bench.main(["--model", tiny_smol_path, "--device", "cpu", "--dtype", "float32", "--max-model-len", "1024",
                         "--num-requests", "8", "--max-tokens", "16", "--modes", "json_schema", "--fill-only",
                         "--profile"])
    prof = result["profile"]
    assert prof["mode"] == "json_schema" and prof["steps"] > 0 and prof["unconstrained_steps"] > 0
    extra = prof["top_extra_own_ms_per_step"]
    assert len(extra) == 20 and prof["own_ms_per_step_total"] > 0
    assert any("bitmask" in name or "accept" in name or "fill" in name for name in extra), list(extra)
