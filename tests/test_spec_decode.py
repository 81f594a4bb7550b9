"""Speculative decoding with the engine-core proposers (n-gram, suffix): configuration, the proposers' lookups,
and greedy outputs token-identical to the plain run while drafts are actually proposed and accepted."""
from __future__ import annotations

import random

import numpy as np
import pytest

from vllm_lite.config import EngineConfig, SpeculativeConfig
from vllm_lite.sampling_params import SamplingParams
from vllm_lite.spec_decode.ngram import ngram_lookup

from spec_utils import OracleProposer, make_core, run_core

BASE = dict(device="cpu", dtype="float32", block_size=4, max_model_len=256)
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


def _repetitive_prompts(n: int = 4, vocab: int = 384) -> list[list[int]]:
    """Random spans repeated: the outputs of a tiny random model repeat too, so lookups find matches."""
    rng = random.Random(3)
    prompts = []
    for _ in range(n):
        span = [rng.randrange(3, vocab) for _ in range(rng.randrange(4, 12))]
        prompts.append(span * rng.randrange(2, 4) + span[:rng.randrange(1, 4)])
    return prompts


# ---------------------------------------------------------------- configuration
def test_speculative_config_fields_defaults_and_errors():
    cfg = EngineConfig.from_kwargs(speculative_config={"method": "ngram", "num_speculative_tokens": 4}).speculative
    assert (cfg.method, cfg.num_speculative_tokens, cfg.prompt_lookup_min, cfg.prompt_lookup_max) == \
        ("ngram", 4, 5, 5)
    assert SpeculativeConfig(method="ngram", num_speculative_tokens=2, prompt_lookup_max=3).prompt_lookup_min == 3
    assert SpeculativeConfig(model="org/EAGLE3-x", num_speculative_tokens=2).method == "eagle3"
    assert SpeculativeConfig(model="small-draft", num_speculative_tokens=2).uses_model
    assert not EngineConfig.from_kwargs().speculative.enabled
    json_cfg = EngineConfig.from_kwargs(speculative_config='{"method": "suffix", "num_speculative_tokens": 5}')
    assert json_cfg.speculative.method == "suffix" and json_cfg.speculative.num_speculative_tokens == 5
    bad = [({"method": "draft_model", "num_speculative_tokens": 2}, "needs `model`"),
           ({"method": "ngram"}, "needs num_speculative_tokens"),
           ({"method": "ngram", "num_speculative_tokens": 0}, "needs num_speculative_tokens >= 1"),
           ({"method": "medusa", "num_speculative_tokens": 2}, "invalid"),
           ({"method": "ngram", "num_speculative_tokens": 2, "model": "x"}, "uses no model"),
           ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
            "larger than"),
           ({"method": "ngram", "num_speculative_tokens": 99}, r"\[0, 15\]"),
           ({"method": "ngram", "num_speculative_tokens": 2, "k": 1}, "unknown speculative_config field")]
    for spec, match in bad:
        with pytest.raises(ValueError, match=match):
            EngineConfig.from_kwargs(speculative_config=spec)
    with pytest.raises(ValueError, match="given twice"):
        EngineConfig.from_kwargs(speculative_config={"method": "ngram", "num_speculative_tokens": 2},
                                 num_speculative_tokens=3)


def test_serve_flag_parses_and_round_trips():
    import argparse

    from vllm_lite.entrypoints.args import add_engine_args, engine_argv, engine_kwargs_from_args
    parser = add_engine_args(argparse.ArgumentParser())
    args = parser.parse_args(["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}'])
    kwargs = engine_kwargs_from_args(args)
    assert EngineConfig.from_kwargs(**kwargs).speculative.method == "ngram"
    again = engine_kwargs_from_args(parser.parse_args(engine_argv(kwargs)[1:]))
    assert again["speculative_config"] == kwargs["speculative_config"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--speculative-config", "[1, 2]"])


# ---------------------------------------------------------------- n-gram lookup
def _ngram_reference(tokens: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """The definition, written plainly: longest n first, most recent earlier occurrence."""
    for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == suffix:
                return tokens[start + n:start + n + k]
    return []


def test_ngram_lookup_matches_its_definition():
    assert ngram_lookup(np.array([1, 2, 3, 4, 9, 1, 2, 3, 5, 7, 1, 2, 3]), 1, 3, 3).tolist() == [5, 7, 1]
    rng = random.Random(0)
    for _ in range(3000):
        tokens = [rng.randrange(4) for _ in range(rng.randrange(1, 30))]
        lo = rng.randrange(1, 4)
        hi = rng.randrange(lo, 6)
        k = rng.randrange(1, 5)
        assert ngram_lookup(np.array(tokens), lo, hi, k).tolist() == _ngram_reference(tokens, lo, hi, k), \
            (tokens, lo, hi, k)


# ---------------------------------------------------------------- greedy identity
@pytest.fixture(scope="module")
def plain_run(tiny_qwen3_path):
    prompts = _repetitive_prompts()
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2)
    return prompts, params, run_core(make_core(tiny_qwen3_path, **BASE), prompts, params)


SUFFIX = {"method": "suffix", "num_speculative_tokens": 4}
METHODS = {"ngram": NGRAM, "suffix": SUFFIX}


def _tokens(results: dict) -> dict:
    return {r: v["tokens"] for r, v in results.items()}


@pytest.mark.parametrize("method", ["ngram", "suffix"])
@pytest.mark.parametrize("scheduling", ["sync", "async", "launch-ahead"])
def test_greedy_identical_to_plain_run_with_logprobs(tiny_qwen3_path, plain_run, method, scheduling):
    """launch-ahead: async scheduling with the next step launched right after a step is applied with nothing left
    in flight (on by default on CUDA only, where it overlaps the caller's output handling)."""
    prompts, params, ref = plain_run
    core = make_core(tiny_qwen3_path, speculative_config=METHODS[method], async_scheduling=scheduling != "sync",
                     **BASE)
    assert not core.launch_ahead  # the CPU default
    ahead = []
    if scheduling == "launch-ahead":
        core.launch_ahead = True
        launch = core._launch_ahead
        core._launch_ahead = lambda: (ahead.append(1), launch())
    got = run_core(core, prompts, params)
    assert _tokens(got) == _tokens(ref)
    assert bool(ahead) == (scheduling == "launch-ahead")
    for r in ref:  # the target's logprobs at every verified row, equal to the plain run's
        for mine, theirs in zip(got[r]["logprobs"], ref[r]["logprobs"], strict=True):
            assert [t for t, _, _ in mine] == [t for t, _, _ in theirs]
            assert [lp for _, lp, _ in mine] == pytest.approx([lp for _, lp, _ in theirs], abs=1e-4)
    stats = core.scheduler.make_stats()
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens > 0
    assert stats.num_drafts > 0 and sum(stats.num_accepted_tokens_per_pos) == stats.num_accepted_tokens


@pytest.mark.parametrize("method", ["ngram", "suffix"])
def test_greedy_identical_with_preemption_chunked_prefill_and_prefix_caching(tiny_qwen3_path, method):
    """A KV cache too small for the batch (preemption by recompute), prefills chunked by a small token budget,
    and prompts sharing a prefix (prefix-cache hits): the outputs are the plain run's under the same settings.
    Synchronous scheduling, so that every step of every request is looked at for drafts (with async scheduling a
    request without drafts runs ahead and is only probed, and the tiny model's repeats are short-lived)."""
    shared = _repetitive_prompts(1)[0] * 2
    prompts = [shared + p for p in _repetitive_prompts(6)]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    kw = dict(BASE, num_gpu_blocks_override=64, max_num_batched_tokens=32, async_scheduling=False)
    ref = run_core(make_core(tiny_qwen3_path, **kw), prompts, params)
    core = make_core(tiny_qwen3_path, speculative_config=METHODS[method], **kw)
    assert _tokens(run_core(core, prompts, params)) == _tokens(ref)
    stats = core.scheduler.make_stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0 and stats.num_accepted_tokens > 0, stats


@pytest.fixture(scope="module")
def llm_pair(tiny_qwen3_path):
    from vllm_lite import LLM
    kw = dict(device="cpu", dtype="float32", max_model_len=256)
    return LLM(tiny_qwen3_path, **kw), LLM(tiny_qwen3_path, speculative_config=NGRAM, **kw)


def test_offline_llm_n_stop_strings_min_tokens_and_accepted_counts(llm_pair):
    plain, spec = llm_pair
    prompts = [{"prompt_token_ids": p} for p in _repetitive_prompts(3)]
    base = SamplingParams(temperature=0.0, max_tokens=30, n=2, min_tokens=4)
    ref = plain.generate(prompts, base, use_tqdm=False)
    text = ref[0].outputs[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]  # a stop string the first prompt's output contains
    params = SamplingParams(temperature=0.0, max_tokens=30, n=2, min_tokens=4, stop=[stop])
    want = plain.generate(prompts, params, use_tqdm=False)
    got = spec.generate(prompts, params, use_tqdm=False)
    assert want[0].outputs[0].finish_reason == "stop" and want[0].outputs[0].stop_reason == stop
    for w, g in zip(want, got, strict=True):
        assert [(o.token_ids, o.text, o.finish_reason, o.stop_reason) for o in g.outputs] == \
            [(o.token_ids, o.text, o.finish_reason, o.stop_reason) for o in w.outputs]
        assert w.num_accepted_tokens == 0 and w.num_draft_tokens == 0
    assert sum(g.num_accepted_tokens for g in got) > 0
    for g in got:
        assert g.num_accepted_tokens == sum(o.num_accepted_tokens for o in g.outputs) <= g.num_draft_tokens


def test_penalties_and_min_tokens_verify_exactly(tiny_qwen3_path):
    """Penalised rows count the drafts before them, and a request below min_tokens verifies only rows that all
    still block its stop ids: every oracle draft is accepted and the outputs are the plain run's. The stop id is
    the token the free run produces at position m (and not before), with min_tokens = m: the plain run stops right
    at the boundary, so a verified row past it that still blocked the stop id would change the output."""
    prompts = _repetitive_prompts(3)
    free = run_core(make_core(tiny_qwen3_path, **BASE), prompts[2:],
                    SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))["0"]["tokens"]
    m = next(i for i in range(5, len(free)) if free[i] not in free[:i])
    params = [SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True, repetition_penalty=2.0),
              SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True, presence_penalty=2.0,
                             frequency_penalty=1.5),
              SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, min_tokens=m,
                             stop_token_ids=[free[m]])]
    ref = run_core(make_core(tiny_qwen3_path, **BASE), prompts, params)
    assert ref["2"]["tokens"] == free[:m + 1] and ref["2"]["finish_reason"] == "stop"
    assert ref["0"]["tokens"] != run_core(make_core(tiny_qwen3_path, **BASE), prompts[:1],
                                          SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)
                                          )["0"]["tokens"]  # the penalty changes the output
    for i in range(3):
        core = make_core(tiny_qwen3_path, proposer=OracleProposer({"0": ref[str(i)]["tokens"]}),
                         num_speculative_tokens=3, **BASE)
        assert run_core(core, prompts[i:i + 1], params[i:i + 1])["0"] == ref[str(i)], i
        stats = core.scheduler.make_stats()
        assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens == stats.num_draft_tokens, (i, stats)


# ---------------------------------------------------------------- suffix proposer
def _req(rid: str, prompt: list[int], outputs: list[int] = ()) -> "Request":
    from vllm_lite.request import Request
    r = Request(rid, prompt, SamplingParams())
    r.append_output_token_ids(list(outputs))
    return r


def test_suffix_draft_length_follows_match_length_and_confidence():
    import gc

    from vllm_lite.spec_decode.suffix import SuffixProposer
    cfg = SpeculativeConfig(method="suffix", num_speculative_tokens=8, suffix_decoding_min_token_prob=0.4)
    p = SuffixProposer(cfg)
    # A 2-token match allows 2 drafts (max_spec_factor 1.0); a 5-token match 5.
    r = _req("a", [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2])
    assert p.propose(r, 8) == [3, 4]
    r.append_output_token_ids([3, 4, 5])
    assert p.propose(r, 8) == [6, 7, 8, 9, 1]
    # [5, 6] was followed by 7, 8 and 9 once each: no continuation reaches probability 0.4. The longest match
    # decides: [7, 5, 6] occurred once, followed by 1, 0, 5.
    assert p.propose(_req("b", [1, 5, 6, 7, 2, 5, 6, 8, 3, 5, 6, 9, 4, 5, 6]), 8) == []
    assert p.propose(_req("c", [7, 5, 6, 1, 0, 5, 6, 2, 0, 7, 5, 6]), 8) == [1, 0, 5]
    # [4, 1] went on with 2, 3 / 2, 5 / 9, 0: 2 wins (2 of 3 >= 0.4), then 3 and 5 tie and the product (1/3)
    # drops below 0.4: one draft.
    assert p.propose(_req("d", [7, 4, 1, 2, 3, 8, 4, 1, 2, 5, 6, 4, 1, 9, 0, 5, 4, 1]), 8) == [2]
    # Outputs of finished requests feed later ones; only the last max_cached_requests are kept.
    cfg1 = SpeculativeConfig(method="suffix", num_speculative_tokens=8, suffix_decoding_max_cached_requests=1)
    p = SuffixProposer(cfg1)
    for rid, outs in (("x", [60, 61, 62, 63, 64]), ("y", [70, 71, 72, 73])):
        done = _req(rid, [50], outs)
        assert p.propose(done, 8) == []
        del done
        gc.collect()
    assert p.propose(_req("z", [5, 70, 71]), 8) == [72, 73]
    assert p.propose(_req("w", [5, 60, 61]), 8) == []  # evicted


# ---------------------------------------------------------------- server, metrics, log
def test_server_with_ngram_matches_offline_and_exports_spec_metrics(tiny_qwen3_path, tmp_path):
    """A real `vllm-lite serve --speculative-config ...` driven by the official openai client: greedy completions
    equal the offline plain run's, and /metrics carries vLLM's spec-decode counters."""
    import json
    import re

    import httpx
    import openai

    from server_utils import RemoteServer
    from vllm_lite import LLM
    prompts = _repetitive_prompts(4)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    plain = LLM(tiny_qwen3_path, device="cpu", dtype="float32", max_model_len=256)
    want = [o.outputs[0].text for o in plain.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                       use_tqdm=False)]
    args = ["--device", "cpu", "--dtype", "float32", "--max-model-len", "256", "--speculative-config",
            json.dumps(NGRAM)]
    with RemoteServer(tiny_qwen3_path, args) as server:
        client = openai.OpenAI(base_url=server.url_for("v1"), api_key="EMPTY", max_retries=0)
        got = [client.completions.create(model=tiny_qwen3_path, prompt=p, max_tokens=24, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text for p in prompts]
        text = httpx.get(server.url_for("metrics")).text
    assert got == want

    def value(name: str) -> float:
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        assert m, f"{name} missing from /metrics"
        return float(m.group(1))

    drafts = value('vllm:spec_decode_num_drafts_total{model_name="%s"}' % tiny_qwen3_path)
    draft_tokens = value('vllm:spec_decode_num_draft_tokens_total{model_name="%s"}' % tiny_qwen3_path)
    accepted = value('vllm:spec_decode_num_accepted_tokens_total{model_name="%s"}' % tiny_qwen3_path)
    first = value('vllm:spec_decode_num_accepted_tokens_per_pos_total{model_name="%s",position="0"}'
                  % tiny_qwen3_path)
    assert 0 < drafts <= draft_tokens and 0 < accepted <= draft_tokens and 0 < first <= drafts


def test_spec_decode_log_line(caplog):
    import logging

    from vllm_lite.protocol import SchedulerStats
    from vllm_lite.spec_decode.metrics import SpecDecodeLogger
    log = SpecDecodeLogger(interval_s=0.0)
    with caplog.at_level(logging.INFO, logger="vllm_lite.spec_decode"):
        log.maybe_log(SchedulerStats(num_drafts=0))
        assert not caplog.records  # nothing verified: no line
        log.maybe_log(SchedulerStats(num_drafts=4, num_draft_tokens=12, num_accepted_tokens=6,
                                     num_accepted_tokens_per_pos=[3, 2, 1]))
    assert "mean acceptance length 2.50" in caplog.text and "acceptance rate 50.0%" in caplog.text
    assert "per-position acceptance 0.75, 0.50, 0.25" in caplog.text
    with caplog.at_level(logging.INFO, logger="vllm_lite.spec_decode"):
        log.maybe_log(SchedulerStats(num_drafts=4), ", 3 request(s) drafting nothing for low acceptance")
    assert "no drafts verified" in caplog.text and "3 request(s) drafting nothing" in caplog.text


# ---------------------------------------------------------------- adaptive draft length, seeds
def test_adaptive_rule_scalar_path_equals_vectorised():
    """A few requests are scored with Python floats (batch-1 speculation runs the rule every step); the result must
    be the vectorised rule's, rounding and ties included."""
    from vllm_lite.spec_decode.adaptive import _best_lengths_np, _choices, best_lengths
    rng = np.random.default_rng(0)
    for trial in range(3000):
        n, k = int(rng.integers(1, 17)), int(rng.integers(1, 9))
        running, saturation = int(rng.integers(1, 600)), int(rng.choice([64, 256, 1024]))
        all_or_none = bool(trial % 2)
        a = rng.random(n) if trial % 3 else np.round(rng.random(n), 2)  # rounded rates land on ties more often
        a[0] = [0.0, 1.0, 0.5][trial % 3]
        overhead = [0.1, 0.0, 1.3][trial % 3]
        j, cost = _choices(k, running, saturation, all_or_none, overhead)
        assert best_lengths(a, k, running, saturation, all_or_none, overhead).tolist() == \
            _best_lengths_np(a, k, j, cost).tolist(), (a, k, running, saturation, all_or_none)


def test_adaptive_rule_batch_limit_and_low_acceptance(caplog):
    import logging

    from vllm_lite.spec_decode.adaptive import AdaptiveDraftLength, best_lengths
    a = np.array([0.0, 0.04, 0.3, 0.9])
    assert best_lengths(a, 3, 1, 256).tolist() == [0, 0, 3, 3]  # batch 1: extra rows nearly free
    assert best_lengths(a, 3, 256, 256).tolist() == [0, 0, 0, 0]  # compute-bound: nothing pays
    assert best_lengths(np.array([0.6]), 4, 100, 256).tolist() == [2]  # in between: a shorter draft
    # With CUDA graphs the worker pads to 1 + k tokens per request: a shorter draft costs as much, so 0 or k
    assert best_lengths(np.array([0.6, 0.2, 0.05]), 4, 100, 256, all_or_none=True).tolist() == [4, 0, 0]
    assert set(best_lengths(np.linspace(0, 1, 50), 4, 1, 256, all_or_none=True).tolist()) == {0, 4}
    policy = AdaptiveDraftLength(SpeculativeConfig(method="ngram", num_speculative_tokens=3,
                                                   disable_by_batch_size=8))
    with caplog.at_level(logging.INFO, logger="vllm_lite.spec_decode"):
        assert policy.allows(8) and not policy.allows(9) and not policy.allows(20) and policy.allows(3)
    assert caplog.text.count("paused") == 1 and caplog.text.count("resumed") == 1
    good, bad = _req("g", [1]), _req("b", [1])
    for _ in range(6):
        policy.observe(good, 3, 3)
        policy.observe(bad, 3, 0)
    assert policy.draft_lengths([good, bad], 2).tolist() == [3, 0] and policy.num_turned_off == 1
    for _ in range(30):  # drafting nothing, the bad request's history fades toward the prior: it is retried
        policy.idle([bad])
    assert policy.draft_lengths([bad], 2).tolist() == [3]
    # A request running ahead is probed every step, then every 2, 4, 4, ... after misses; a hit starts over.
    ahead = _req("a", [1])
    due = []
    for _ in range(12):
        due.append(policy.probe_due(ahead))
        if due[-1]:
            policy.probe_missed(ahead)
    assert due == [True, True, False, True, False, False, False, True, False, False, False, True]
    policy.idle([ahead])
    assert not ahead.spec_wait
    policy.drafted(ahead)
    assert ahead.spec_wait and policy.probe_due(ahead)
    fixed = AdaptiveDraftLength(SpeculativeConfig(method="ngram", num_speculative_tokens=3,
                                                  adaptive_draft_length=False))
    fixed.observe(bad, 3, 0)
    assert fixed.draft_lengths([bad], 2).tolist() == [3]


def test_wrong_drafts_are_turned_down(tiny_qwen3_path, plain_run):
    """Drafts that are never accepted stop being asked for after a few verifications (and are retried now and
    then), while outputs stay the plain run's."""
    from spec_utils import WrongProposer
    prompts, params, ref = plain_run
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    ref = run_core(make_core(tiny_qwen3_path, **BASE), prompts, params)
    wrong = WrongProposer(_tokens(ref), vocab_size=384)
    core = make_core(tiny_qwen3_path, proposer=wrong, num_speculative_tokens=3, **BASE)
    assert _tokens(run_core(core, prompts, params)) == _tokens(ref)
    stats = core.scheduler.make_stats()
    assert stats.num_accepted_tokens == 0 and 0 < stats.num_drafts < len(prompts) * 60 / 3


def test_seeded_random_sampling_with_speculation_reproduces(tiny_qwen3_path):
    prompts = _repetitive_prompts(3)
    params = [SamplingParams(temperature=0.8, top_p=0.95, seed=11 + i, max_tokens=24, ignore_eos=True)
              for i in range(3)]
    runs = [run_core(make_core(tiny_qwen3_path, speculative_config=NGRAM, **BASE), prompts, params)
            for _ in range(2)]
    assert _tokens(runs[0]) == _tokens(runs[1])
    other = run_core(make_core(tiny_qwen3_path, speculative_config=NGRAM, **BASE), prompts,
                     [SamplingParams(temperature=0.8, top_p=0.95, seed=99, max_tokens=24, ignore_eos=True)] * 3)
    assert _tokens(other) != _tokens(runs[0])


def test_seeded_request_does_not_depend_on_its_neighbours_drafts(tiny_qwen3_path):
    """A seeded random request that verifies one draft per step produces the same tokens whether the request beside
    it verifies one draft or three per step (its random draws do not follow the batch's widest draft)."""

    class Fixed:
        def __init__(self, neighbour_drafts: int) -> None:
            self.n = neighbour_drafts

        def propose(self, request, k):
            return [5] if request.request_id == "0" else [7] * self.n

    prompts = _repetitive_prompts(2)
    params = [SamplingParams(temperature=0.8, seed=5, max_tokens=24, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)]
    runs = [run_core(make_core(tiny_qwen3_path, proposer=Fixed(n), num_speculative_tokens=3, **BASE), prompts,
                     params) for n in (1, 3)]
    assert runs[0]["0"]["tokens"] == runs[1]["0"]["tokens"]
    assert runs[0]["1"]["tokens"] == runs[1]["1"]["tokens"]  # greedy: the drafts never change it


def test_requests_without_drafts_keep_async_overlap(tiny_qwen3_path):
    """A request with nothing to draft runs ahead (its next step launches while the previous is in flight); a
    request that drafts every step waits for each of its steps, applied in the step() that launched it. Outputs are
    the plain run's either way."""
    from spec_utils import OracleProposer

    class Never:
        def propose(self, request, k):
            return []

    prompts = _repetitive_prompts(1)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    ref = run_core(make_core(tiny_qwen3_path, **BASE), prompts, params)
    for proposer, overlapped in ((Never(), True), (OracleProposer(_tokens(ref)), False)):
        core = make_core(tiny_qwen3_path, proposer=proposer, num_speculative_tokens=3, **BASE)
        launched_while_busy = []
        launch = core.executor.execute_model

        def spy(so, core=core, launch=launch, seen=launched_while_busy):
            seen.append(bool(core.in_flight))
            return launch(so)

        core.executor.execute_model = spy
        steps = []
        step = core.step
        core.step = lambda step=step, steps=steps: steps.append(1) or step()
        assert _tokens(run_core(core, prompts, params)) == _tokens(ref)
        assert (sum(launched_while_busy) > 10) == overlapped, launched_while_busy
        if not overlapped:  # each verifying step is applied in the step() that launched it: no empty steps between
            assert len(steps) == len(launched_while_busy), (len(steps), len(launched_while_busy))


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_mixed_verification_steps_padded_to_one_graph_shape(tiny_qwen3_path, async_scheduling):
    """On CUDA the worker pads a verification step whose requests verify different draft counts (or none) to 1 + k
    tokens each, the shape of its CUDA graph (padding on here, on the CPU): the padded rows are computed but never
    sampled, their KV goes to the requests' own lookahead slots and is overwritten later. Greedy tokens and logprobs
    equal the plain run's, and a seeded random request reproduces its unpadded run."""
    from spec_utils import OracleProposer

    class Mixed(OracleProposer):  # request 0: k drafts, 1: one draft, 2: none (it runs ahead)
        def propose(self, request, k):
            right = super().propose(request, k)
            return {"0": right, "1": right[:1]}.get(request.request_id, [])

    prompts = _repetitive_prompts(3)
    params = [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2)] * 2 + \
        [SamplingParams(temperature=0.9, seed=3, max_tokens=24, ignore_eos=True, logprobs=2)]
    ref = run_core(make_core(tiny_qwen3_path, **BASE), prompts, params)
    runs = []
    for pad in (False, True):
        core = make_core(tiny_qwen3_path, proposer=Mixed(_tokens(ref)), num_speculative_tokens=3,
                         async_scheduling=async_scheduling, **BASE)
        runner = core.executor.worker.runner
        assert not runner.pad_verification  # CPU: no graphs
        runner.pad_verification = pad
        padded = []
        choose = runner._verification_padding
        runner._verification_padding = lambda *a, choose=choose: padded.append(choose(*a)) or padded[-1]
        runs.append(run_core(core, prompts, params))
        assert (sum(1 for q in padded if q) > 3) == pad and set(padded) <= {0, 4}
        assert core.scheduler.make_stats().num_accepted_tokens > 0
    for r in ("0", "1"):
        assert runs[1][r]["tokens"] == ref[r]["tokens"]
        for mine, theirs in zip(runs[1][r]["logprobs"], ref[r]["logprobs"], strict=True):
            assert [t for t, _, _ in mine] == [t for t, _, _ in theirs]
            assert [lp for _, lp, _ in mine] == pytest.approx([lp for _, lp, _ in theirs], abs=1e-4)
    assert runs[1]["2"]["tokens"] == runs[0]["2"]["tokens"]
