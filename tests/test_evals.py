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


def _run_against_reference(tmp_path, limit: int, num_shots: int, max_tokens: int) -> None:
    args = gsm8k.build_parser().parse_args([
        "--limit", str(limit), "--num-shots", str(num_shots), "--reference", "hf", "--max-tokens", str(max_tokens),
        "--serve-args", "--dtype float32 --device cpu", "--output", str(tmp_path)])
    summary = gsm8k.run(args)
    data = json.loads((tmp_path / "gsm8k.json").read_text())
    assert summary["questions"] == limit and summary["errors"] == 0
    for rec in data["records"]:
        assert rec["pred"] == rec["reference_pred"], rec
        assert rec["token_agreement"] in ("identical", "near_tie"), rec
        assert rec["completion_tokens"] > 0
    assert summary["same_answer"] == limit
    assert summary["accuracy"] == summary["reference_accuracy"]
    assert (tmp_path / "gsm8k.md").exists()


def test_gsm8k_server_equals_transformers_fast(tmp_path) -> None:
    """3 questions (2-shot, at most 64 tokens) through a real server: extracted answers equal transformers'."""
    _run_against_reference(tmp_path, limit=3, num_shots=2, max_tokens=64)


@pytest.mark.slow
def test_gsm8k_server_equals_transformers_10(tmp_path) -> None:
    """The acceptance run: 10 questions with the 5-shot recipe through a real server, equal to transformers."""
    _run_against_reference(tmp_path, limit=10, num_shots=5, max_tokens=256)


def test_cli_dispatch_help(capsys) -> None:
    from vllm_lite.entrypoints.cli import main
    with pytest.raises(SystemExit) as exc:
        main(["eval", "gsm8k", "--help"])
    assert exc.value.code == 0 and "--max-concurrency" in capsys.readouterr().out
    assert isinstance(gsm8k.build_parser().parse_args([]), argparse.Namespace)
