"""`vllm-lite bench serve` end to end on the CPU against a real tiny server: the JSON fields are sane (every request
completes with exactly its requested output length, TTFT > 0, percentiles ordered), a sweep writes its plot, the
GSM8K chat workload runs, and --launch starts and stops a server itself; the soak's short mode (slow)."""
from __future__ import annotations

import json

import pytest

from server_utils import RemoteServer
from tiny_models import make_tiny_model

from vllm_lite.benchmarks import serve
from vllm_lite.benchmarks.serve_report import parse_goodput, phase_sums, server_phases

VOCAB = 384  # tests/tiny_models.py's vocabulary
ARGS = ["--device", "cpu", "--dtype", "float32", "--max-model-len", "256", "--seed", "0"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("bench-serve-model"), "llama")


@pytest.fixture(scope="module")
def server(model_dir):
    with RemoteServer(model_dir, ARGS) as srv:
        yield srv


def _check_run(run: dict, num: int, out_len: int, prompt_tokens: int | None = None) -> None:
    assert run["completed"] == num and run["failed"] == 0 and run["server_errors_5xx"] == 0, run["errors"]
    assert run["total_output_tokens"] == num * out_len and run["exact_output_lengths"]
    if prompt_tokens is not None:
        assert run["total_input_tokens"] == prompt_tokens
    for name in ("ttft", "tpot", "itl", "e2el"):
        assert 0 < run[f"median_{name}_ms"] <= run[f"p90_{name}_ms"] <= run[f"p99_{name}_ms"], name
    assert run["median_ttft_ms"] < run["median_e2el_ms"]
    assert run["request_throughput"] > 0 and run["output_throughput"] > 0
    assert run["total_token_throughput"] > run["output_throughput"]


def test_random_prompts_exact_lengths_and_goodput(server, tmp_path):
    out = tmp_path / "r.json"
    result = serve.main(["--base-url", server.url_for(), "--num-prompts", "6", "--random-input-len", "16",
                         "--random-output-len", "8", "--random-vocab-size", str(VOCAB), "--max-concurrency", "2",
                         "--goodput", "ttft:100000", "tpot:0.001", "--json", str(out), "--no-progress"])
    _check_run(result, 6, 8, prompt_tokens=6 * 16)
    assert result["model"] == server.model and result["max_concurrency"] == 2 and result["request_rate"] == "inf"
    assert result["request_goodput"] == 0.0  # nobody makes a 1 us TPOT
    assert json.loads(out.read_text())["completed"] == 6
    # the server's own phases (its /metrics): the engine's queue + prefill is part of the client's TTFT
    assert 0 < result["server_mean_prefill_ms"] and 0 < result["server_mean_decode_ms"] < result["mean_e2el_ms"]
    assert 0 <= result["server_mean_queue_ms"]
    assert 0 < result["ttft_outside_engine_ms"] < result["mean_ttft_ms"]


def test_phase_sums_of_a_metrics_text():
    text = ('vllm:request_prefill_time_seconds_sum{model_name="m"} 0.5\n'
            'vllm:request_prefill_time_seconds_count{model_name="m"} 2.0\n'
            'vllm:request_queue_time_seconds_sum{model_name="m"} 0.1\n'
            'vllm:request_queue_time_seconds_count{model_name="m"} 2.0\n'
            'vllm:request_prefill_time_seconds_bucket{le="0.3",model_name="m"} 1.0\n')
    before = {"prefill": (1.0, 0.2), "queue": (1.0, 0.05)}
    assert phase_sums(text) == {"prefill": (2.0, 0.5), "queue": (2.0, 0.1)}
    phases = server_phases(before, phase_sums(text), mean_ttft_ms=400.0)
    assert phases["server_mean_prefill_ms"] == pytest.approx(300.0)
    assert phases["server_mean_queue_ms"] == pytest.approx(50.0)
    assert phases["ttft_outside_engine_ms"] == pytest.approx(50.0)
    assert phase_sums("") == {} and server_phases({}, {}, 1.0) == {}


def test_gsm8k_chats_at_a_poisson_rate(server):
    result = serve.main(["--base-url", server.url_for(), "--dataset", "gsm8k", "--num-prompts", "4",
                         "--random-output-len", "6", "--request-rate", "20", "--goodput", "ttft:100000",
                         "--no-progress"])
    _check_run(result, 4, 6)
    assert result["total_input_tokens"] > 4 * 20  # real questions through the chat template
    assert result["request_goodput"] == pytest.approx(result["request_throughput"])


def test_launch_and_sweep_writes_a_plot(model_dir, tmp_path):
    pytest.importorskip("matplotlib")
    plot, out = tmp_path / "sweep.png", tmp_path / "sweep.json"
    result = serve.main(["--launch", "--model", model_dir, *ARGS, "--num-prompts", "4", "--random-input-len", "8",
                         "--random-output-len", "4", "--random-range-ratio", "0.5", "--random-vocab-size",
                         str(VOCAB), "--sweep", "50,inf", "--plot", str(plot), "--json", str(out), "--no-progress"])
    runs = result["runs"]
    assert [r["request_rate"] for r in runs] == [50.0, "inf"] and result["launched"]
    for run in runs:
        assert run["completed"] == 4 and run["failed"] == 0 and run["exact_output_lengths"]
        assert 4 * 2 <= run["total_output_tokens"] <= 4 * 6 and run["median_ttft_ms"] > 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and json.loads(out.read_text())["plot"] == str(plot)


def test_bad_flags_are_refused():
    with pytest.raises(ValueError, match="ttft, tpot or e2el"):
        parse_goodput(["itl:5"])
    with pytest.raises(SystemExit):
        serve.main(["--request-rate", "0"])
    with pytest.raises(SystemExit, match="NAME:MILLISECONDS"):
        serve.main(["--goodput", "ttft:fast"])


@pytest.mark.slow
def test_soak_short_mode(model_dir):
    """bench/soak.py for 30 s at concurrency 16: no 5xx, greedy outputs equal their solo runs, RSS flat, idle at
    the end (the 10-minute run is recorded in docs/PERF.md)."""
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "soak.py")
    spec = importlib.util.spec_from_file_location("soak", path)
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    report = soak.main(["--model", model_dir, "--serve-args", "--device cpu --dtype float32 --max-model-len 1024",
                        "--duration", "30", "--concurrency", "16", "--long-prompt-tokens", "300"])
    assert report["passed"], report
    assert report["counts"]["requests"] >= 50 and report["counts"].get("greedy", 0) > 0
