"""Design data for grammar-forced drafts (jump-forward decoding as speculation): along the default model's own greedy
json_schema answers, how many steps a request would take if each step also verified the tokens of the text its grammar
forces next (xgrammar's `find_jump_forward_string()`, tokenized on its own) as drafts, with every token known when the
drafts are made (no async lag). A draft is accepted while it equals the model's token, as greedy verification under the
masks would. Runs the model on the CPU (fp32), so it takes a few minutes.

With --engine N, the first N requests then run one at a time through the engine: plain, with n-gram lookup alone
(method "ngram", 1..4 tokens) and with method "grammar" (spec_decode/grammar_forced.py: the forced text, else the same
lookup), k = 4; their forward steps (tokens minus accepted drafts) are compared (the outputs must be identical).

    python bench/tools/grammar_forced_replay.py --num-requests 24 --engine 12
"""
from __future__ import annotations

import argparse

from vllm_lite import LLM
from vllm_lite.benchmarks.structured import params_for, workload


def replay(manager, tokenizer, items, outs, k: int, compact: bool) -> dict[str, float]:
    """Steps of forced-draft speculation over the answers `outs` (token ids) at up to k drafts a step."""
    import xgrammar as xgr

    tokens = steps = proposed = accepted = 0
    for (_, schema), ids in zip(items, outs):
        so = params_for("json_schema", schema, 256).structured_outputs
        if compact:
            so.disable_any_whitespace = True
        matcher = xgr.GrammarMatcher(manager.compile_now(so))
        i = 0
        while i < len(ids):
            forced = matcher.find_jump_forward_string()
            drafts = tokenizer.encode(forced, add_special_tokens=False)[:k] if forced else []
            a = 0
            while a < len(drafts) and i + a < len(ids) and drafts[a] == ids[i + a]:
                a += 1
            take = min(a + 1, len(ids) - i)  # the accepted drafts, then the token the step samples
            for t in ids[i:i + take]:
                if not matcher.is_terminated():
                    matcher.accept_token(t)
            proposed += len(drafts)
            accepted += a
            i += take
            steps += 1
        tokens += len(ids)
    return {"tokens": tokens, "steps": steps, "fewer_steps": round(1 - steps / max(tokens, 1), 4),
            "proposed": proposed, "accepted": accepted, "acceptance": round(accepted / max(proposed, 1), 4)}


def engine_steps(model: str | None, items: list, compact: bool) -> None:
    """Requests one at a time, plain, n-gram and "grammar" speculation (k = 4): forward steps, drafts, outputs."""
    runs = []
    lookup = {"num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 4}
    for spec in (None, {"method": "ngram", **lookup}, {"method": "grammar", **lookup}):
        llm = LLM(model, device="cpu", dtype="float32", max_model_len=2048, speculative_config=spec)
        outs = []
        for messages, schema in items:
            params = params_for("json_schema", schema, 256)
            params.structured_outputs.disable_any_whitespace = compact
            outs.append(list(llm.chat([messages], [params], use_tqdm=False)[0].outputs[0].token_ids))
        s = llm.engine.scheduler
        tokens = sum(map(len, outs))
        print(f"  engine, {spec['method'] if spec else 'plain'}: {len(items)} requests, {tokens} tokens, "
              f"{tokens - s.num_accepted_tokens} forward steps, {s.num_draft_tokens} drafts, "
              f"{s.num_accepted_tokens} accepted", flush=True)
        runs.append(outs)
    print(f"  engine outputs identical: {all(r == runs[0] for r in runs)}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="default: the default model")
    ap.add_argument("--num-requests", type=int, default=24)
    ap.add_argument("--engine", type=int, default=0, metavar="N",
                    help="then run N requests through the engine with and without speculative method 'grammar'")
    args = ap.parse_args()
    llm = LLM(args.model, device="cpu", dtype="float32", max_model_len=2048)
    tokenizer = llm.get_tokenizer()
    items = workload(args.num_requests)
    for compact in (False, True):
        params = []
        for _, schema in items:
            p = params_for("json_schema", schema, 256)
            p.structured_outputs.disable_any_whitespace = compact
            params.append(p)
        print(f"generating {len(items)} answers ({'disable_any_whitespace' if compact else 'any whitespace'})...",
              flush=True)
        outs = [list(o.outputs[0].token_ids) for o in llm.chat([m for m, _ in items], params, use_tqdm=False)]
        for k in (2, 4, 8):
            print(f"  k={k}: {replay(llm.engine.structured, tokenizer, items, outs, k, compact)}", flush=True)
        if args.engine:
            engine_steps(args.model, items[:args.engine], compact)


if __name__ == "__main__":
    main()
