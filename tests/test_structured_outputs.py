"""Structured outputs through the engine (issue 13): xgrammar-constrained JSON schema, JSON object, regex, choice
and EBNF outputs, checked with `jsonschema` / full regex matches.

A tiny random Llama with the real default model's tokenizer (SmolLM2, 49152 tokens) samples at temperature 1 with
seeds, so outputs wander over everything each grammar allows; every output that finishes with "stop" must parse
and validate, and every output (also those cut by max_tokens) must be a sequence the grammar accepts. The real
default model answers a few schemas greedily. Also: mixed constrained and plain requests (plain greedy outputs
unchanged), async scheduling on and off (identical seeded outputs), n=2, preemption, speculative drafts (same
outputs as without), a compile that times out alone, and the refusals of validate_structured_outputs.
"""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from vllm_lite import LLM, SamplingParams, StructuredOutputsParams
from vllm_lite.benchmarks.step_breakdown import StepBreakdown
from vllm_lite.config import StructuredOutputsConfig
from vllm_lite.structured_output.manager import StructuredOutputManager
from vllm_lite.structured_output.validate import validate_structured_outputs

from spec_utils import OracleProposer, WrongProposer, make_core, run_core
from structured_schemas import CHOICES, GRAMMARS, INVALID, REAL_MODEL_SCHEMAS, REGEXES, SCHEMAS
from tiny_models import DEFAULT_VOCAB as SMOL_VOCAB

FORMATS = jsonschema.Draft202012Validator.FORMAT_CHECKER
TINY = dict(device="cpu", dtype="float32", max_model_len=512, kv_cache_memory_bytes=64 << 20)
PROMPT = [{"role": "user", "content": "Answer with JSON only."}]


def _need_default_model() -> None:
    from vllm_lite.model_loader.default_model import default_gguf_path
    try:
        default_gguf_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def llm(tiny_smol_path):
    return LLM(tiny_smol_path, **TINY)


def _json_params(seed: int, schema: dict, **kw) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=kw.pop("max_tokens", 160),
                          structured_outputs=StructuredOutputsParams(json=schema, disable_any_whitespace=True, **kw))


def _accepted_by_grammar(llm: LLM, params: StructuredOutputsParams, token_ids: list[int]) -> bool:
    """Whether a fresh matcher of the request's grammar takes every output token (stop tokens included)."""
    import xgrammar as xgr
    manager = llm.engine.structured
    matcher = xgr.GrammarMatcher(manager.compile_now(params))
    return all(matcher.accept_token(t) for t in token_ids)


def _check_json_outputs(llm, cases, outs) -> tuple[int, int]:
    """Every "stop" output validates; every output is a grammar-accepted sequence. Returns (stopped, total)."""
    stopped = total = 0
    for (name, schema, params), out in zip(cases, outs):
        for comp in out.outputs:
            total += 1
            assert _accepted_by_grammar(llm, params.structured_outputs, comp.token_ids), (name, comp.text)
            if comp.finish_reason == "stop":
                stopped += 1
                try:
                    jsonschema.validate(json.loads(comp.text), schema, format_checker=FORMATS)
                except (ValueError, jsonschema.ValidationError) as exc:
                    pytest.fail(f"{name}: {comp.text!r} does not validate: {exc}")
            else:
                assert comp.finish_reason == "length", (name, comp.finish_reason, comp.stop_reason)
    return stopped, total


@pytest.fixture(scope="module")
def schema_run(llm):
    """Every schema twice (two seeds) in one batch, beside 3 plain greedy requests; and the plain ones alone."""
    cases = [(name, schema, _json_params(seed, schema)) for seed in (1, 2) for name, schema in SCHEMAS.items()]
    plain = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    prompts = [PROMPT] * len(cases) + [[{"role": "user", "content": f"Count to {i}."}] for i in range(3)]
    outs = llm.chat(prompts, [c[2] for c in cases] + [plain] * 3, use_tqdm=False)
    alone = llm.chat(prompts[-3:], plain, use_tqdm=False)
    return cases, outs, alone


def test_schema_collection_covers_the_issue():
    text = json.dumps(SCHEMAS)
    assert len(SCHEMAS) >= 40 and len(INVALID) >= 20
    for keyword in ('"anyOf"', '"oneOf"', '"$ref"', '"$defs"', '"const"', '"enum"', '"pattern"', '"format"',
                    '"minItems"', '"maxItems"', '"minimum"', '"exclusiveMinimum"', '"additionalProperties": false'):
        assert keyword in text, keyword


def test_json_schemas_validate_on_random_model(llm, schema_run):
    cases, outs, _ = schema_run
    stopped, total = _check_json_outputs(llm, cases, outs[: len(cases)])
    assert stopped >= 0.75 * total, f"only {stopped} of {total} outputs finished with stop"


def test_plain_greedy_outputs_unchanged_beside_constrained_ones(schema_run):
    cases, outs, alone = schema_run
    mixed = outs[len(cases):]
    assert [o.outputs[0].token_ids for o in mixed] == [o.outputs[0].token_ids for o in alone]


def test_regex_choice_and_ebnf_fully_match(llm):
    reqs = [("regex", r, r) for r in REGEXES] + [("choice", c, "|".join(map(re.escape, c))) for c in CHOICES] \
        + [("grammar", g, want) for g, want in GRAMMARS.values()]
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=40, structured_outputs=StructuredOutputsParams(
        **{kind: spec})) for i, (kind, spec, _) in enumerate(reqs) for _ in range(2)]
    outs = llm.generate(["Say something:"] * len(params), params, use_tqdm=False)
    for (kind, spec, want), out in zip([r for r in reqs for _ in range(2)], outs):
        comp = out.outputs[0]
        assert comp.finish_reason == "stop", (kind, spec, comp.text)
        assert re.fullmatch(want, comp.text), (kind, spec, comp.text)


def test_async_and_sync_scheduling_give_identical_constrained_outputs(tiny_smol_path, llm, schema_run):
    cases, outs, _ = schema_run
    some = list(range(0, len(cases), 4))
    sync = LLM(tiny_smol_path, async_scheduling=False, **TINY)
    got = sync.chat([PROMPT] * len(some), [cases[i][2] for i in some], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [outs[i].outputs[0].token_ids for i in some]


def test_chunked_prefill_gives_identical_constrained_outputs(tiny_smol_path, schema_run):
    """Prompts split over several steps (a 16-token budget): partial prefills get no bitmask rows."""
    cases, outs, _ = schema_run
    some = list(range(2, len(cases), 5))
    chunked = LLM(tiny_smol_path, max_num_batched_tokens=16, **TINY)
    got = chunked.chat([PROMPT] * len(some), [cases[i][2] for i in some], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [outs[i].outputs[0].token_ids for i in some]


def test_preemption_keeps_matchers(tiny_smol_path, schema_run):
    """A KV cache too small for the batch preempts requests (recompute); their matchers carry on, so the seeded
    outputs equal the roomy run's."""
    cases, outs, _ = schema_run
    some = list(range(1, len(cases), 3))
    small = LLM(tiny_smol_path, **{**TINY, "kv_cache_memory_bytes": None, "max_model_len": 256},
                num_gpu_blocks_override=64, block_size=4)
    got = small.chat([PROMPT] * len(some), [cases[i][2] for i in some], use_tqdm=False)
    assert small.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in got] == [outs[i].outputs[0].token_ids for i in some]


def test_n2_has_one_matcher_per_sequence(llm):
    schema = SCHEMAS["order_form"]
    params = SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=120,
                            structured_outputs=StructuredOutputsParams(json=schema, disable_any_whitespace=True))
    out = llm.chat(PROMPT, params, use_tqdm=False)[0]
    assert len(out.outputs) == 2 and out.outputs[0].token_ids != out.outputs[1].token_ids
    _check_json_outputs(llm, [("order_form", schema, params)], [out])


def test_json_object_and_whitespace_options(llm):
    """json_object gives an object; with disable_any_whitespace the output has no whitespace outside strings."""
    obj = SamplingParams(temperature=0.0, max_tokens=60, structured_outputs=StructuredOutputsParams(json_object=True))
    out = llm.chat(PROMPT, obj, use_tqdm=False)[0].outputs[0]
    assert out.text.lstrip().startswith("{")
    if out.finish_reason == "stop":
        assert isinstance(json.loads(out.text), dict)
    schema = SCHEMAS["additional_false_many"]
    text = llm.chat(PROMPT, _json_params(3, schema), use_tqdm=False)[0].outputs[0].text
    assert not re.search(r"\s", text) and jsonschema.validate(json.loads(text), schema) is None


def _manager(path: str) -> StructuredOutputManager:
    from transformers import AutoTokenizer
    return StructuredOutputManager(StructuredOutputsConfig(), lambda: AutoTokenizer.from_pretrained(path),
                                   SMOL_VOCAB, (2,))


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_spec_drafts_give_the_same_constrained_outputs(tiny_smol_path, async_scheduling):
    """Greedy constrained outputs with oracle drafts (all the grammar allows are accepted) and with wrong drafts
    (cut by the grammar or rejected) equal the run without drafts."""
    names = ["flat_person", "array_of_objects", "oneof_discriminated", "format_date", "tuple_prefix_items"]
    params = [SamplingParams(temperature=0.0, max_tokens=48, structured_outputs=StructuredOutputsParams(
        json=SCHEMAS[n], disable_any_whitespace=True)) for n in names]
    prompts = [[1, 5, 9 + i, 200 + 7 * i] for i in range(len(names))]
    kw = dict(TINY, async_scheduling=async_scheduling)
    ref = run_core(make_core(tiny_smol_path, grammar=_manager(tiny_smol_path), **kw), prompts, params)
    tokens = {r: v["tokens"] for r, v in ref.items()}
    for proposer in (OracleProposer(tokens), WrongProposer(tokens, SMOL_VOCAB)):
        core = make_core(tiny_smol_path, proposer=proposer, grammar=_manager(tiny_smol_path),
                         num_speculative_tokens=3, **kw)
        assert run_core(core, prompts, params) == ref
        stats = core.scheduler.make_stats()
        assert stats.num_draft_tokens > 0
        if isinstance(proposer, WrongProposer):
            assert stats.num_accepted_tokens == 0
        else:
            assert stats.num_accepted_tokens > 0


def test_slow_compile_times_out_alone(tiny_smol_path):
    """A grammar still compiling after compile_timeout_s fails that request ("error", the reason in stop_reason)
    while another constrained request completes; the compile goes on in the background."""
    slow = LLM(tiny_smol_path, structured_outputs_config={"compile_timeout_s": 0.3}, **TINY)
    huge_enum = {"enum": [f"value_{i}_{i * 7919 % 10007}" for i in range(20000)]}  # seconds to compile
    good_params = SamplingParams(temperature=1.0, seed=0, max_tokens=60, structured_outputs=StructuredOutputsParams(
        json=SCHEMAS["flat_person"], disable_any_whitespace=True))
    slow.generate(["w"], good_params, use_tqdm=False)  # compiled (and cached) before the clock matters
    params = [SamplingParams(max_tokens=30, structured_outputs=StructuredOutputsParams(json=huge_enum)), good_params]
    bad, good = slow.generate(["x", "y"], params, use_tqdm=False)
    assert bad.outputs[0].finish_reason == "error" and bad.outputs[0].token_ids == []
    assert "timed out after 0.3 s" in bad.outputs[0].stop_reason
    assert good.outputs[0].finish_reason in ("stop", "length") and good.outputs[0].token_ids
    assert any(not f.done() for f in slow.engine.structured._futures.values())


@pytest.mark.parametrize("kwargs,message", INVALID, ids=[f"invalid{i}" for i in range(len(INVALID))])
def test_invalid_constraints_are_refused(kwargs, message):
    with pytest.raises(ValueError) as info:
        validate_structured_outputs(StructuredOutputsParams(**kwargs))
    assert message in str(info.value)


def test_exactly_one_constraint_and_offline_refusal(llm):
    with pytest.raises(ValueError, match="exactly one kind of constraint"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="got json, regex"):
        StructuredOutputsParams(json={"type": "string"}, regex="a+")
    bad = SamplingParams(structured_outputs=StructuredOutputsParams(regex="(ab"))
    with pytest.raises(ValueError, match="structured_outputs.regex is invalid"):
        llm.generate(["a", "b"], [SamplingParams(), bad], use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()  # nothing of the batch was queued


@pytest.fixture(scope="module")
def real_llm():
    _need_default_model()
    return LLM("smollm2-135m-instruct", device="cpu", max_model_len=1024)


def _real_model_check(real_llm, names: list[str], max_tokens: int) -> None:
    prompts = [[{"role": "user", "content": f"Give an example JSON object for this schema: "
                 f"{json.dumps(SCHEMAS[n])}"}] for n in names]
    params = [SamplingParams(temperature=0.0, max_tokens=max_tokens, structured_outputs=StructuredOutputsParams(
        json=SCHEMAS[n], disable_any_whitespace=True)) for n in names]
    prompts.append([{"role": "user", "content": "Give the name and country of the capital of France as a JSON "
                                                 "object."}])
    params.append(SamplingParams(temperature=0.0, max_tokens=48, structured_outputs=StructuredOutputsParams(
        json_object=True, disable_any_whitespace=True)))
    prompts.append([{"role": "user", "content": "Is the sky blue? Answer yes or no."}])
    params.append(SamplingParams(temperature=0.0, max_tokens=8,
                                 structured_outputs=StructuredOutputsParams(choice=["yes", "no"])))
    outs = real_llm.chat(prompts, params, use_tqdm=False)
    for name, out in zip(names, outs):
        comp = out.outputs[0]
        assert comp.finish_reason == "stop", (name, comp.text)
        jsonschema.validate(json.loads(comp.text), SCHEMAS[name], format_checker=FORMATS)
    obj = outs[-2].outputs[0]
    assert obj.finish_reason == "stop" and isinstance(json.loads(obj.text), dict), obj.text
    assert outs[-1].outputs[0].text in ("yes", "no")


def test_real_model_greedy_answers_validate(real_llm):
    _real_model_check(real_llm, REAL_MODEL_SCHEMAS[:2], 40)


@pytest.mark.slow
def test_real_model_more_schemas(real_llm):
    _real_model_check(real_llm, REAL_MODEL_SCHEMAS[2:], 128)


def test_structured_outputs_flags_reach_the_config():
    import argparse
    from vllm_lite.config import EngineConfig
    from vllm_lite.entrypoints.args import add_engine_args, engine_argv, engine_kwargs_from_args
    parser = add_engine_args(argparse.ArgumentParser())
    args = parser.parse_args(["--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}',
                              "--structured-outputs-compile-timeout", "2.5"])
    kwargs = engine_kwargs_from_args(args)
    so = EngineConfig.from_kwargs(**kwargs).structured_outputs
    assert (so.backend, so.disable_any_whitespace, so.compile_timeout_s) == ("xgrammar", True, 2.5)
    again = engine_kwargs_from_args(add_engine_args(argparse.ArgumentParser()).parse_args(engine_argv(kwargs)[1:]))
    assert EngineConfig.from_kwargs(**again).structured_outputs == so
    assert EngineConfig.from_kwargs().structured_outputs.compile_timeout_s == 10.0
    for bad, message in [({"backend": "outlines"}, "backend"), ({"nope": 1}, "unknown structured_outputs_config"),
                         ({"compile_timeout_s": 0}, "compile timeout")]:
        with pytest.raises(ValueError, match=message):
            EngineConfig.from_kwargs(structured_outputs_config=bad)


def test_engine_core_process_compiles_and_masks(tiny_smol_path):
    """The server's path: StructuredOutputsParams cross the socket to the engine core process, which loads the
    tokenizer itself for its manager; a regex and a schema come back valid, a slow grammar ends in "error"."""
    import asyncio

    from vllm_lite.config import EngineConfig
    from vllm_lite.engine.async_client import AsyncEngineClient
    from vllm_lite.tokenizer import load_tokenizer

    config = EngineConfig.from_kwargs(model=tiny_smol_path, structured_outputs_config={"compile_timeout_s": 1},
                                      **TINY)
    client = AsyncEngineClient(config, tokenizer_loader=load_tokenizer)
    huge_enum = {"enum": [f"item_{i}_{i * 7919 % 10007}" for i in range(60000)]}  # the process ends it
    params = {"re": SamplingParams(temperature=1.0, seed=3, max_tokens=30,
                                   structured_outputs=StructuredOutputsParams(regex=REGEXES[0])),
              "js": _json_params(4, SCHEMAS["event"]),
              "slow": SamplingParams(max_tokens=8, structured_outputs=StructuredOutputsParams(json=huge_enum))}

    async def one(rid: str) -> object:
        state = None
        async for state in client.generate(rid, None, [1, 2, 3, 4], params[rid]):
            pass
        return state.sequences[0]

    async def run() -> list:
        await asyncio.wait_for(client.start(), 120)
        return await asyncio.wait_for(asyncio.gather(*(one(r) for r in params)), 120)

    try:
        regex, js, slow = asyncio.run(run())
    finally:
        client.shutdown()
    def text(seq: object) -> str:
        return client.tokenizer.decode(seq.token_ids, skip_special_tokens=True)
    assert regex.finish_reason == "stop" and re.fullmatch(REGEXES[0], text(regex))
    if js.finish_reason == "stop":
        jsonschema.validate(json.loads(text(js)), SCHEMAS["event"], format_checker=FORMATS)
    assert slow.finish_reason == "error" and "timed out" in slow.stop_reason


def test_abort_while_compiling_and_no_tokenizer(tiny_smol_path):
    """A request aborted while its grammar compiles is dropped by the manager; an engine without a tokenizer
    refuses constrained requests (ValueError) and nothing is queued."""
    import time

    from vllm_lite.protocol import EngineCoreRequest
    from vllm_lite.request import RequestStatus

    enum = {"enum": [f"v{i}_{i * 7919 % 10007}" for i in range(3000)]}
    params = SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(json=enum))
    core = make_core(tiny_smol_path, grammar=_manager(tiny_smol_path), **TINY)
    core.add_request(EngineCoreRequest("a", [1, 2, 3], params, time.time()))
    assert core.scheduler.requests["a"].status == RequestStatus.WAITING_FOR_FSM
    core.abort_requests(["a"])
    core.step()
    assert not core.structured.compiling and not core.has_unfinished_requests()
    bare = make_core(tiny_smol_path, **TINY)
    with pytest.raises(ValueError, match="needs the engine's tokenizer"):
        bare.add_request(EngineCoreRequest("b", [1, 2, 3], params, time.time()))
    assert not bare.has_unfinished_requests()


def test_deferred_bitmask_fill_gives_identical_outputs(tiny_smol_path, schema_run, monkeypatch):
    """With fill threads (a host of several cores), a large batch's bitmask fill runs on a thread while step()
    returns its outputs to the caller and while the next step() schedules, and that step() samples it before its
    launch; the tokens sampled under each grammar's own mask are advanced in one batch call (on that thread when the
    fill is deferred). The outputs equal those of matchers advanced token by token in the scheduler and filled in
    place, seeded sampling included, and the interpreter's switch interval is back to its value afterwards. The same
    without xgrammar's native batch API (older versions): its Python wrappers, which take the matchers."""
    import sys

    import vllm_lite.structured_output.grammar as grammar_module
    import vllm_lite.structured_output.manager as manager_module
    monkeypatch.setattr(manager_module, "BATCH_FILL_MIN_ROWS", 8)  # from 64 rows: defer most of this run's steps
    cases, _, _ = schema_run
    params = [c[2] for c in cases]
    interval = sys.getswitchinterval()
    runs = []
    native = grammar_module.native_batch_api
    for threads, defer_fill, defer_tokens, api in ((1, False, False, native), (1, False, True, native),
                                                   (2, True, True, native), (1, True, True, native),
                                                   (2, True, True, lambda: None)):
        monkeypatch.setattr(grammar_module, "native_batch_api", api)
        monkeypatch.setattr(manager_module, "native_batch_api", api)
        llm = LLM(tiny_smol_path, structured_outputs_config={"fill_threads": threads, "defer_fill": defer_fill},
                  **TINY)
        manager = llm.engine.structured
        own_handles = []  # whether each grammar's handle is its matcher itself (only without the native API)
        attach = manager._attach
        manager._attach = lambda r, c, f=attach, seen=own_handles: f(r, c) or seen.append(
            r.grammar.handle is r.grammar.matcher)
        if not defer_tokens:
            manager._deferred = None  # the grammars get no sink: every token is taken in the scheduler
        fills, advanced = [], []
        fill = manager._advance_and_fill
        manager._advance_and_fill = lambda *a, f=fill, seen=fills: seen.append(1) or f(*a)
        advance = manager._advance
        manager._advance = lambda g, m, t, f=advance, seen=advanced: seen.append(len(g)) or f(g, m, t)
        if not defer_tokens:
            manager._take_deferred = lambda: ([], [], [])
        breakdown = StepBreakdown(llm)
        order = []  # the next schedule() runs while a deferred fill may still run; its sampling waits for it after
        engine = llm.engine
        step, schedule, wait_fill = engine.step, engine.scheduler.schedule, engine._wait_fill
        engine.step = lambda f=step: order.append("step") or f()
        engine.scheduler.schedule = lambda f=schedule: order.append("schedule") or f()
        engine._wait_fill = lambda fut, f=wait_fill: order.append("fill") or f(fut)
        runs.append([o.outputs[0].token_ids for o in llm.chat([PROMPT] * len(params), params, use_tqdm=False)])
        steps = " ".join(order).split("step")
        assert all(s.split() in (["schedule", "fill"], ["schedule"], ["fill"], []) for s in steps), steps
        assert sum(s.split() == ["schedule", "fill"] for s in steps) == len(fills)  # a deferred fill, then scheduled
        assert (len(fills) > 20) == defer_fill, len(fills)
        assert (breakdown.take()["fill_wait"] > 0) == defer_fill  # the deferred fills' results were waited for
        assert (sum(advanced) > 100) == defer_tokens, sum(advanced)
        assert llm.engine._deferred_sample is None and not llm.engine.in_flight
        assert sys.getswitchinterval() == interval
        assert own_handles and set(own_handles) == {api() is None}
        assert manager.fill_times and len(manager.fill_times) <= manager.fill_times.maxlen  # bounded (a server)
        assert len(manager.fill_phases) == len(fills) and all(min(p) >= 0 for p in manager.fill_phases)
        assert not any(r.grammar.refused for r in manager.requests.values())
        llm.engine.shutdown()
    assert runs[0] == runs[1] == runs[2] == runs[3] == runs[4]


def test_launch_ahead_with_the_manager_but_no_grammar(tiny_smol_path):
    """An engine with a tokenizer always has the grammar manager; launch-ahead (CUDA's default, forced here) must
    still run for unconstrained speculating requests, and not while a request has a grammar. Outputs equal the
    engine without drafts either way."""
    plain = [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)] * 2
    constrained = [SamplingParams(temperature=0.0, max_tokens=24, structured_outputs=StructuredOutputsParams(
        json=SCHEMAS["flat_person"], disable_any_whitespace=True))]
    prompts = [[1, 5, 9, 200], [1, 5, 10, 207]]
    kw = dict(TINY, async_scheduling=True)
    for params, want_ahead in ((plain, True), (constrained, False)):
        ps = prompts[: len(params)]
        ref = run_core(make_core(tiny_smol_path, grammar=_manager(tiny_smol_path), **kw), ps, params)
        tokens = {r: v["tokens"] for r, v in ref.items()}
        core = make_core(tiny_smol_path, proposer=OracleProposer(tokens), grammar=_manager(tiny_smol_path),
                         num_speculative_tokens=3, **kw)
        core.launch_ahead = True
        ahead: list[int] = []
        launch = core._launch_ahead
        core._launch_ahead = lambda: (ahead.append(1), launch())
        assert run_core(core, ps, params) == ref
        assert bool(ahead) == want_ahead
