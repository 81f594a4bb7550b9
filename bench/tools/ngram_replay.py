"""What n-gram and suffix speculation can give on a workload, without timing anything: the plain engine's greedy
outputs of bench spec ngram's edit and chat prompts, then every n-gram (k, prompt_lookup_min, prompt_lookup_max) and
suffix (k, max_spec_factor) config replayed over them step by step (greedy speculation is lossless, so the
speculative run produces exactly these tokens). Suffix replays the requests in order, each one's outputs joining
the shared corpus when it ends, as in the engine.

Per config: tokens per engine step (the ceiling of the speed-up if a verification step cost what a plain one does),
the share of steps that verify drafts, mean acceptance length over those, and the acceptance rate per draft.

    python bench/tools/ngram_replay.py [--device cpu --dtype float32] [--num-passages 20] [--configs 4:2:4,8:2:4]
        [--suffix-configs 8:1,15:1]
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from vllm_lite.benchmarks.spec import CHAT_PROMPTS, EDIT_PROMPT, _passages
from vllm_lite.config import SpeculativeConfig
from vllm_lite.sampling_params import SamplingParams
from vllm_lite.spec_decode.ngram import ngram_lookup
from vllm_lite.spec_decode.suffix import SuffixProposer


class _Request:
    """What SuffixProposer reads of a request (its weakref finalizer retires the outputs when this goes)."""

    def __init__(self, prompt: list[int]) -> None:
        self.all_token_ids = list(prompt)
        self.num_prompt_tokens = len(prompt)


def replay(records: list[tuple[list[int], list[int]]], k: int, min_n: int, max_n: int) -> dict:
    """n-gram lookup over each record's prompt + output so far."""
    def propose(req: _Request, k: int) -> list[int]:
        return ngram_lookup(np.array(req.all_token_ids, dtype=np.int64), min_n, max_n, k).tolist()
    return {"k": k, "prompt_lookup_min": min_n, "prompt_lookup_max": max_n, **_replay(records, k, propose)}


def replay_suffix(records: list[tuple[list[int], list[int]]], k: int, spec_factor: float) -> dict:
    """Suffix speculation with the engine's proposer (a fresh shared corpus per config)."""
    proposer = SuffixProposer(SpeculativeConfig(method="suffix", num_speculative_tokens=k,
                                                suffix_decoding_max_spec_factor=spec_factor))
    return {"method": "suffix", "k": k, "max_spec_factor": spec_factor, **_replay(records, k, proposer.propose)}


def _replay(records: list[tuple[list[int], list[int]]], k: int, propose) -> dict:
    """records: (prompt ids, greedy output ids). The first output token comes from the prefill step. full_share:
    the verifications of k drafts (the others are padded to k by the worker on CUDA)."""
    steps = verifies = accepted = drafted = tokens = full = 0
    for prompt, out in records:
        req = _Request(prompt + out[:1])
        pos = 1
        while pos < len(out):
            drafts = propose(req, k)
            a = 0
            while a < len(drafts) and pos + a < len(out) and drafts[a] == out[pos + a]:
                a += 1
            steps += 1
            verifies += bool(drafts)
            full += len(drafts) == k
            drafted += len(drafts)
            accepted += a
            tokens += a + 1
            req.all_token_ids.extend(out[pos:pos + a + 1])
            pos += a + 1
        del req  # finished: its outputs join the suffix proposer's shared corpus
    return {"full_share": round(full / max(verifies, 1), 3),
            "tokens_per_step": round(tokens / max(steps, 1), 3), "verify_share": round(verifies / max(steps, 1), 3),
            "mean_acceptance_length": round((accepted + verifies) / max(verifies, 1), 3),
            "acceptance_rate": round(accepted / max(drafted, 1), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--num-passages", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--configs", default="2:2:4,4:2:4,4:1:4,4:3:4,8:2:4,8:1:4,8:2:8,12:2:6,16:2:8",
                    help="k:prompt_lookup_min:prompt_lookup_max, comma-separated")
    ap.add_argument("--suffix-configs", default="4:1,8:1,15:1,8:2",
                    help="k:suffix_decoding_max_spec_factor, comma-separated")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from vllm_lite import LLM
    llm = LLM(args.model, device=args.device, dtype=args.dtype, max_num_seqs=32)
    workloads = {"edit": [[{"role": "user", "content": EDIT_PROMPT.format(passage=p)}]
                          for p in _passages(None, args.num_passages)],
                 "chat": [[{"role": "user", "content": c}] for c in CHAT_PROMPTS]}
    configs = [tuple(int(x) for x in c.split(":")) for c in args.configs.split(",")]
    result: dict = {"model": args.model, "device": str(llm.device), "max_tokens": args.max_tokens}
    for name, convs in workloads.items():
        outs = llm.chat(convs, SamplingParams(temperature=0.0, max_tokens=args.max_tokens), use_tqdm=False)
        records = [(list(o.prompt_token_ids), list(o.outputs[0].token_ids)) for o in outs]
        suffix = [c.split(":") for c in args.suffix_configs.split(",") if c]
        result[name] = {"output_tokens": sum(len(r[1]) for r in records),
                        "configs": [replay(records, *c) for c in configs]
                        + [replay_suffix(records, int(k), float(f)) for k, f in suffix]}
        for row in result[name]["configs"]:
            print(name, row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
