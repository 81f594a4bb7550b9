"""The evals (vllm_lite.evals): GSM8K prompt building and answer extraction against hand-written cases, the
reference-agreement rule, the report writer, and a GSM8K run through a real `vllm-lite serve` on the default model
whose answers equal transformers' greedy answers on the same model (fp32)."""
from __future__ import annotations

import argparse
import json
import os
import sys

import pytest

from vllm_lite.evals import gsm8k
from vllm_lite.evals.reference import compare_tokens, truncate_at_stop
from vllm_lite.evals.report import mean_interval, wilson_interval, write_report

TRAIN = [{"question": "Q one?", "answer": "1 + 1 = <<1+1=2>>2\n#### 2"},
         {"question": "Q two?", "answer": "It is 1,000.\n#### 1,000"},
         {"question": "Q three?", "answer": "#### 3"}]
TEST = [{"question": "What is 5 - 7?", "answer": "5 - 7 = -2\n#### -2"}]


@pytest.mark.parametrize("text, expected", [
    ("#### 18", 18),
    ("She makes 9 * 2 = $18 every day.\n#### 18\n\n", 18),
    ("The total is 1,234,567 dollars", 1234567),      # commas removed first
    ("It costs $1,000.", 1000),
    ("The answer is -5", 5),                           # vLLM's \d+ drops the sign (label and answer alike)
    ("from -3 to -12", 12),
    ("about 4.5 pears", 5),                            # the last run of digits, as vLLM's extractor
    ("12 apples, then 7", 7),
    ("no number here", gsm8k.INVALID),
    ("", gsm8k.INVALID),
])
def test_extract_answer(text: str, expected: int) -> None:
    assert gsm8k.extract_answer(text) == expected


def test_prompt_builder_matches_vllm_recipe() -> None:
    prompts = gsm8k.build_prompts(TRAIN, TEST, num_shots=2)
    assert prompts == ["Question: Q one?\nAnswer: 1 + 1 = <<1+1=2>>2\n#### 2\n\n"
                       "Question: Q two?\nAnswer: It is 1,000.\n#### 1,000\n\n"
                       "Question: What is 5 - 7?\nAnswer:"]
    assert gsm8k.build_prompts(TRAIN, TEST, num_shots=0) == ["Question: What is 5 - 7?\nAnswer:"]
    assert gsm8k.extract_answer(TRAIN[1]["answer"]) == 1000


def test_shared_data_found_and_complete() -> None:
    folder = gsm8k.find_data_dir(None)
    test = gsm8k.load_jsonl(os.path.join(folder, "test.jsonl"))
    train = gsm8k.load_jsonl(os.path.join(folder, "train.jsonl"))
    assert (len(test), len(train)) == (1319, 7473)
    assert all(gsm8k.extract_answer(ex["answer"]) != gsm8k.INVALID for ex in test)
    assert gsm8k.build_prompts(train, test[:1], 5)[0].count("Question: ") == 6
    with pytest.raises(FileNotFoundError, match="test.jsonl"):
        gsm8k.find_data_dir(os.path.dirname(folder))


def test_compare_tokens_rule() -> None:
    top = [{"a": -0.1, "x": -2.5}, {"b": -0.2, "y": -1.9}, {"c": -0.3}]
    assert compare_tokens(["a", "b", "c"], top, ["a", "b", "c"], top) == ("identical", None)
    assert compare_tokens(["a", "b"], top, ["a", "b", "c"], top) == ("identical", None)  # one stopped earlier
    top_y = [{"a": -0.1}, {"y": -0.2, "b": -0.3}]
    assert compare_tokens(["a", "b", "c"], top, ["a", "y", "z"], top_y) == ("near_tie", 1)
    assert compare_tokens(["a", "b"], top, ["a", "q"], [{"a": 0.0}, {"q": -0.1, "b": -0.5}]) == ("mismatch", 1)
    assert truncate_at_stop(" 2 + 2 = 4\n#### 4\n\nQuestion: next", gsm8k.STOP) == " 2 + 2 = 4\n#### 4\n\n"
    assert truncate_at_stop("Assistant: hi Question", gsm8k.STOP) == ""


def test_intervals_hand_computed() -> None:
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.40383, abs=1e-4) and hi == pytest.approx(0.59617, abs=1e-4)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.27753, abs=1e-4)
    lo, hi = mean_interval([0.0, 1.0, 0.5, 0.5])
    assert (lo, hi) == pytest.approx((0.5 - 1.96 * (1 / 6) ** 0.5 / 2, 0.5 + 1.96 * (1 / 6) ** 0.5 / 2))


def test_report_files(tmp_path, monkeypatch, capsys) -> None:
    from vllm_lite.evals.report import bar_with_interval
    plot = ("acc.png", bar_with_interval(["engine"], [0.5], [(0.4, 0.6)], "t", "accuracy"))
    paths = write_report(str(tmp_path / "a"), "x", "X", {"accuracy": 0.5, "n": 2}, [{"i": 0}, {"i": 1}], [plot])
    data = json.loads(open(paths["json"]).read())
    assert data == {"summary": {"accuracy": 0.5, "n": 2}, "records": [{"i": 0}, {"i": 1}]}
    assert "| accuracy | 0.5 |" in open(paths["markdown"]).read()
    pytest.importorskip("matplotlib")
    with open(paths["plot0"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the optional extra absent: plots skipped, a message
    paths = write_report(str(tmp_path / "b"), "x", "X", {"n": 1}, [], [plot])
    assert set(paths) == {"json", "markdown"} and "plots skipped" in capsys.readouterr().out


@pytest.fixture(scope="module")
def default_server():
    """`vllm-lite serve` of the default model in fp32 on the CPU, shared by the GSM8K runs (its base URL)."""
    from vllm_lite.evals.server import EvalServer
    with EvalServer("smollm2-135m-instruct", "--dtype float32 --device cpu") as srv:
        yield srv.base_url


def _run_against_reference(tmp_path, base_url: str, limit: int, num_shots: int, max_tokens: int,
                           chat: bool = False) -> None:
    args = gsm8k.build_parser().parse_args([
        "--limit", str(limit), "--num-shots", str(num_shots), "--reference", "hf", "--max-tokens", str(max_tokens),
        "--base-url", base_url, "--model", "smollm2-135m-instruct", "--output", str(tmp_path),
        *(["--chat"] if chat else [])])
    summary = gsm8k.run(args)
    data = json.loads((tmp_path / "gsm8k.json").read_text())
    assert summary["questions"] == limit and summary["errors"] == 0
    assert summary["mode"] == ("chat" if chat else "completions")
    for rec in data["records"]:
        assert rec["pred"] == rec["reference_pred"], rec
        assert rec["token_agreement"] in ("identical", "near_tie"), rec
        assert rec["completion_tokens"] > 0
    assert summary["same_answer"] == limit
    assert summary["accuracy"] == summary["reference_accuracy"]
    assert (tmp_path / "gsm8k.md").exists()


def test_gsm8k_server_equals_transformers_fast(tmp_path, default_server) -> None:
    """3 questions (1-shot, at most 32 tokens) through a real server: extracted answers equal transformers'."""
    _run_against_reference(tmp_path, default_server, limit=3, num_shots=1, max_tokens=32)


def test_gsm8k_chat_equals_transformers(tmp_path, default_server) -> None:
    """--chat: the prompt as one user message through the chat template, on both sides."""
    _run_against_reference(tmp_path, default_server, limit=2, num_shots=1, max_tokens=24, chat=True)


@pytest.mark.slow
def test_gsm8k_server_equals_transformers_10(tmp_path, default_server) -> None:
    """The acceptance run: 10 questions with the 5-shot recipe through a real server, equal to transformers."""
    _run_against_reference(tmp_path, default_server, limit=10, num_shots=5, max_tokens=256)


def test_cli_dispatch_help(capsys) -> None:
    from vllm_lite.entrypoints.cli import main
    with pytest.raises(SystemExit) as exc:
        main(["eval", "gsm8k", "--help"])
    assert exc.value.code == 0 and "--max-concurrency" in capsys.readouterr().out
    assert isinstance(gsm8k.build_parser().parse_args([]), argparse.Namespace)


# ---- MRCR ---------------------------------------------------------------------------------------------------------

def test_mrcr_grader_hand_computed() -> None:
    from vllm_lite.evals.mrcr_data import grade
    assert grade("abcXYZ", "abcXYW", "abc") == pytest.approx(2 * 2 / 6)      # matches X, Y of 3 + 3 characters
    assert grade("hhello world", "hhello there", "h") == pytest.approx(2 * 7 / 22)  # "hello " and "r"
    assert grade("abcXYW", "abcXYW", "abc") == 1.0
    assert grade("XYW", "abcXYW", "abc") == 0.0                                # no hash first: 0
    assert grade(" abcXYW", "abcXYW", "abc") == 0.0
    assert grade("abc", "abcXYW", "abc") == 0.0                                # the hash alone matches nothing


def test_mrcr_generator_deterministic_and_in_format() -> None:
    import re
    from vllm_lite.evals.mrcr_data import FIELDS, generate_record
    rec = generate_record(3, 4, 5000)
    assert rec == generate_record(3, 4, 5000)
    assert rec["prompt"] != generate_record(4, 4, 5000)["prompt"]
    assert set(FIELDS) <= set(rec)
    messages = json.loads(rec["prompt"])
    assert rec["total_messages"] == len(messages) and rec["n_chars"] == sum(len(m["content"]) for m in messages)
    assert rec["n_chars"] >= 5000 and rec["n_needles"] == 4
    assert "EXAMPLE" in messages[0]["content"] and messages[0]["role"] == "user"
    assert [m["role"] for m in messages[1:-1]] == ["user", "assistant"] * ((len(messages) - 2) // 2)
    final = re.fullmatch(r"Prepend (\w{10}) to the (\d+)(?:st|nd|rd|th) \(1 indexed\) (.+) about (.+)\. Do not "
                         r"include any other text in your response\.", messages[-1]["content"])
    assert final and messages[-1]["role"] == "user"
    hash_, k, fmt, topic = final.group(1), int(final.group(2)), final.group(3), final.group(4)
    assert rec["random_string_to_prepend"] == hash_ and 1 <= k <= 4
    needle = f"write {'an' if fmt[0] in 'aeiou' else 'a'} {fmt} about {topic}"
    needle_at = [i for i, m in enumerate(messages) if m["role"] == "user" and m["content"] == needle]
    assert len(needle_at) == 4  # the same wording each time
    assert rec["desired_msg_index"] == needle_at[k - 1] + 1
    assert messages[rec["desired_msg_index"]]["role"] == "assistant"
    assert rec["answer"] == hash_ + messages[rec["desired_msg_index"]]["content"]
    replies = [messages[i + 1]["content"] for i in needle_at]
    assert len(set(replies)) == 4  # distinct replies to identical requests


def test_mrcr_bins_and_dataset_loader(tmp_path) -> None:
    from vllm_lite.evals import mrcr
    from vllm_lite.evals.mrcr_data import FIELDS, generate_record, load_dataset
    assert mrcr.parse_bins("4k-8k,8k-16k") == [(4096, 8192), (8192, 16384)]
    # the default model's 8192-token context with 1024 answer tokens: only 4K-8K, capped at 7168 prompt tokens
    assert mrcr.usable_bins(mrcr.parse_bins(mrcr.DEFAULT_BINS), 8192, 1024) == [(4096, 8192, 7168)]
    assert mrcr.usable_bins(mrcr.parse_bins(mrcr.DEFAULT_BINS), 32768, 1024) == [(4096, 8192, 8192),
                                                                                 (8192, 16384, 16384)]
    records = [generate_record(s, n, 3000) for s, n in ((0, 2), (1, 8))]
    with open(tmp_path / "mrcr.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    expected = [{k: r[k] for k in FIELDS} for r in records]
    assert load_dataset(str(tmp_path / "mrcr.jsonl")) == expected
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    pd.DataFrame(records).to_parquet(tmp_path / "mrcr.parquet")
    assert load_dataset(str(tmp_path / "mrcr.parquet")) == expected


def test_mrcr_end_to_end_tiny_server(tmp_path, tiny_model_factory) -> None:
    """The whole eval through a real server (tiny random model, 8192-token context): records sized into the bin by
    the server's /tokenize, a bin beyond the context skipped, every score equal to the grader's."""
    from vllm_lite.evals import mrcr
    from vllm_lite.evals.mrcr_data import grade
    path = tiny_model_factory("llama", max_position_embeddings=8192)
    args = mrcr.build_parser().parse_args([
        "--model", path, "--bins", "3k-6k,8k-16k", "--samples", "1", "--needles", "2,4", "--max-tokens", "8",
        "--serve-args", "--dtype float32 --device cpu", "--output", str(tmp_path)])
    summary = mrcr.run(args)
    assert summary["records"] == 2 and summary["errors"] == 0 and summary["skipped_bins"] == ["8K-16K"]
    assert summary["max_model_len"] == 8192
    data = json.loads((tmp_path / "mrcr.json").read_text())
    for rec in data["records"]:
        assert rec["bin"] == "3K-6K" and 3072 <= rec["prompt_tokens"] <= 6144
        assert rec["score"] == grade(rec["response"], rec["answer"], rec["answer"][:10])
        assert 0 < rec["completion_tokens"] <= 8
    assert sorted(r["n_needles"] for r in data["records"]) == [2, 4]
    assert "| 3K-6K | 2 | 1 |" in (tmp_path / "mrcr.md").read_text()


# ---- lm-evaluation-harness ------------------------------------------------------------------------------------------

def test_lm_eval_local_completions_scores_like_hf(tmp_path, tiny_llama_path) -> None:
    """lm-eval's local-completions (echo=true loglikelihoods through a real server) scores the 20-question
    multiple-choice task exactly as lm-eval's own transformers backend on the same model (fp32)."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("tenacity")  # lm-eval's API models need its [api] extra
    from vllm_lite.evals import lm_eval_compat
    args = lm_eval_compat.build_parser().parse_args([
        "--model", tiny_llama_path, "--hf", "--hf-device", "cpu", "--serve-args", "--dtype float32 --device cpu",
        "--output", str(tmp_path)])
    report = lm_eval_compat.run(args)
    server, hf = report["server"]["vllm_lite_mc"], report["hf"]["vllm_lite_mc"]
    assert server["sample_len"] == hf["sample_len"] == 20
    assert server["acc,none"] == hf["acc,none"]
    assert report["max_abs_loglikelihood_diff"]["vllm_lite_mc"] < 1e-4


def test_eval_client_drops_idle_connections_before_the_server_does():
    """With equal idle times (httpx's default 5 s, uvicorn's 5 s) a client may send on a connection the server is
    closing at that instant: 2 of 1,319 GSM8K questions failed with a connection error at concurrency 256 on the
    H200. The evals' client lets idle connections go sooner than the server."""
    import asyncio

    from vllm_lite.entrypoints.args import CLIENT_KEEP_ALIVE_S, SERVER_KEEP_ALIVE_S
    from vllm_lite.evals.client import make_client
    client = make_client("http://127.0.0.1:1/v1", None)
    pool = client._client._transport._pool  # httpx keeps the limits on its connection pool only
    assert pool._keepalive_expiry == CLIENT_KEEP_ALIVE_S < SERVER_KEEP_ALIVE_S
    asyncio.run(client.close())
