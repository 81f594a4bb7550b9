"""lm-evaluation-harness against the server: `python -m vllm_lite.evals.lm_eval_compat --model MODEL` scores lm-eval
tasks through `local-completions` (the OpenAI-compatible /v1/completions; loglikelihood requests use echo=true with
logprobs, i.e. prompt logprobs) and, with `--hf`, through lm-eval's own transformers backend on the same model, and
reports both with the largest per-request loglikelihood difference, so a user sees that the server scores like
transformers. Needs `pip install lm-eval` (not a dependency of vllm-lite).

Two local tasks are written at run time (lm-eval reads data files by absolute path, nothing is downloaded):
- `vllm_lite_mc`: 20 hand-written 4-way multiple-choice questions (evals/data/lm_eval_mc.jsonl), metric acc;
- `vllm_lite_gsm8k`: GSM8K from shared/data/gsm8k with the prompt of `vllm-lite eval gsm8k` (first-n train
  examples as few-shots, greedy, max 256 tokens, vLLM's stop strings), scored with lm-eval's flexible extraction
  (the last number) as exact match, to compare with `vllm-lite eval gsm8k` (within a point: the extractors differ
  only on decimals and signs)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from vllm_lite.evals.gsm8k import MAX_TOKENS, STOP, find_data_dir
from vllm_lite.evals.server import add_server_args, server_for

MC_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "lm_eval_mc.jsonl")

MC_TASK = """task: vllm_lite_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

GSM8K_TASK = """task: vllm_lite_gsm8k
dataset_path: json
dataset_kwargs:
  data_files:
    train: {train}
    test: {test}
test_split: test
fewshot_split: train
fewshot_config:
  sampler: first_n
num_fewshot: {num_shots}
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
target_delimiter: " "
fewshot_delimiter: "\\n\\n"
generation_kwargs:
  until: {stop}
  do_sample: false
  temperature: 0.0
  max_gen_toks: {max_tokens}
filter_list:
  - name: flexible-extract
    filter:
      - function: regex
        group_select: -1
        regex_pattern: "(-?[$0-9.,]{{2,}})|(-?[0-9]+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: false
    regexes_to_ignore: [",", "\\\\$", "(?s).*#### ", "\\\\.$"]
"""


def write_tasks(folder: str, num_shots: int = 5, gsm8k_data: str | None = None) -> str:
    """Write the two task YAMLs into folder (an lm-eval include path) and return it."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vllm_lite_mc.yaml"), "w") as f:
        f.write(MC_TASK.format(data=json.dumps(MC_DATA)))
    try:
        data_dir = find_data_dir(gsm8k_data)
    except FileNotFoundError:
        return folder  # the GSM8K task needs the data; the MC task does not
    with open(os.path.join(folder, "vllm_lite_gsm8k.yaml"), "w") as f:
        f.write(GSM8K_TASK.format(train=json.dumps(os.path.join(data_dir, "train.jsonl")),
                                  test=json.dumps(os.path.join(data_dir, "test.jsonl")), num_shots=num_shots,
                                  stop=json.dumps(STOP), max_tokens=MAX_TOKENS))
    return folder


def evaluate(model: str, model_args: dict[str, Any], tasks: list[str], include_path: str,
             limit: int | None = None) -> dict[str, Any]:
    """lm_eval.simple_evaluate with per-sample logs; returns {"results": {task: metrics}, "samples": {...}}."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, limit=limit, log_samples=True,
                                  task_manager=TaskManager(include_path=include_path), random_seed=0,
                                  numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    return {"results": out["results"], "samples": out["samples"]}


def loglikelihoods(samples: list[dict[str, Any]]) -> list[float] | None:
    """Every loglikelihood lm-eval computed, in document and choice order (None for a generation task)."""
    out = []
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        for resp in s["resps"]:
            if not isinstance(resp[0], (list, tuple)):
                return None
            out.append(float(resp[0][0]))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vllm_lite.evals.lm_eval_compat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("lm-eval")
    g.add_argument("--tasks", default="vllm_lite_mc", help="comma-separated lm-eval tasks")
    g.add_argument("--limit", type=int, default=None, help="documents per task")
    g.add_argument("--num-shots", type=int, default=5, help="few-shots of vllm_lite_gsm8k")
    g.add_argument("--data", default=None, help="GSM8K folder (default: shared/data/gsm8k)")
    g.add_argument("--hf", action="store_true", help="also score with lm-eval's transformers backend")
    g.add_argument("--hf-dtype", default="float32", help="dtype of the transformers backend")
    g.add_argument("--hf-device", default=None, help="device of the transformers backend (default: cuda if any)")
    g.add_argument("--batch-size", default="8", help="batch size of the transformers backend")
    g.add_argument("--timeout", type=int, default=3600,
                   help="lm-eval's per-request time limit in seconds (its default, 300, also counts the wait for one "
                        "of --max-concurrency connections, so a long run on a slow server times out)")
    add_server_args(p)
    p.set_defaults(max_concurrency=32, output="eval_results")
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from vllm_lite.config import LoadConfig, ModelConfig
    from vllm_lite.model_loader.resolve import resolve_model
    tasks = args.tasks.split(",")
    include = write_tasks(os.path.join(args.output, "lm_eval_tasks"), args.num_shots, args.data)
    path = resolve_model(ModelConfig(model=args.model or "smollm2-135m-instruct"), LoadConfig(), "cpu").path
    with server_for(args) as base_url:
        served = args.model if args.base_url else (args.model or "smollm2-135m-instruct")
        server = evaluate("local-completions", {
            "base_url": base_url.rstrip("/") + "/completions", "model": served, "tokenizer": path,
            "tokenizer_backend": "huggingface", "num_concurrent": args.max_concurrency, "max_retries": 1,
            "tokenized_requests": True, "max_length": 8192, "timeout": args.timeout}, tasks, include, args.limit)
    report: dict[str, Any] = {"server": server["results"]}
    if args.hf:
        device = args.hf_device or ("cuda" if torch.cuda.is_available() else "cpu")
        hf = evaluate("hf", {"pretrained": path, "dtype": args.hf_dtype, "device": device,
                             "batch_size": args.batch_size}, tasks, include, args.limit)
        report["hf"] = hf["results"]
        report["max_abs_loglikelihood_diff"] = {}
        for t in tasks:
            ours, theirs = loglikelihoods(server["samples"][t]), loglikelihoods(hf["samples"][t])
            if ours is not None and theirs is not None:
                report["max_abs_loglikelihood_diff"][t] = max(abs(a - b) for a, b in zip(ours, theirs))
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "lm_eval_compat.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(json.dumps(report, indent=1, default=str))
    return report


def main(argv: list[str] | None = None) -> int:
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
