"""Grammar-forced drafts (speculative method "grammar", spec_decode/grammar_forced.py): a constrained request drafts
the text its grammar forces next, n-gram lookup drafts where nothing is forced; greedy outputs are those of plain
(masked) decoding token for token, sampled ones match their schemas, and drafts are proposed and accepted."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vllm_lite import LLM, SamplingParams, StructuredOutputsParams
from vllm_lite.config import EngineConfig, StructuredOutputsConfig
from vllm_lite.request import Request
from vllm_lite.structured_output.manager import StructuredOutputManager

from server_utils import REPO_ROOT
from structured_schemas import SCHEMAS
from tiny_models import DEFAULT_VOCAB as SMOL_VOCAB

TINY = dict(device="cpu", dtype="float32", max_model_len=512, kv_cache_memory_bytes=64 << 20)
GRAMMAR = {"method": "grammar", "num_speculative_tokens": 4}
PROMPT = [{"role": "user", "content": "Answer with JSON only."}]


def test_forced_text_is_proposed_as_tokens(tiny_smol_path):
    """The proposer drafts the tokens of the forced text (up to max_tokens); n-gram lookup for a request without a
    grammar, at a choice between several ways on, or once the grammar ended."""
    import xgrammar as xgr
    from transformers import AutoTokenizer

    from vllm_lite.spec_decode.grammar_forced import GrammarForcedProposer
    from vllm_lite.spec_decode.ngram import NgramProposer
    from vllm_lite.structured_output.grammar import Grammar
    tokenizer = AutoTokenizer.from_pretrained(tiny_smol_path)
    manager = StructuredOutputManager(StructuredOutputsConfig(), lambda: tokenizer, SMOL_VOCAB, (2,))
    proposer = GrammarForcedProposer(manager, NgramProposer(1, 4))
    manager.compiler  # noqa: B018 (waits until it is built: tokenizer_info is set with it)
    stops = frozenset(manager.tokenizer_info.stop_token_ids)

    def request(params: StructuredOutputsParams | None, tokens: tuple[int, ...] = (1, 2)) -> Request:
        r = Request("r", list(tokens), SamplingParams())
        if params is not None:
            r.grammar = Grammar(xgr.GrammarMatcher(manager.compile_now(params)), stops)
        return r

    assert proposer.propose(request(None), 4) == []
    assert proposer.propose(request(None, (5, 6, 7, 8, 5, 6)), 4) == [7, 8, 5, 6]  # n-gram lookup: no grammar
    const = request(StructuredOutputsParams(json={"const": "hello world, again"}))
    forced = tokenizer.encode('"hello world, again"', add_special_tokens=False)
    assert len(forced) > 3 and proposer.propose(const, 3) == forced[:3] and proposer.propose(const, 0) == []
    long = "word " * 400  # a forced text longer than what is tokenized of it
    long_const = request(StructuredOutputsParams(json={"const": long}))
    drafts = proposer.propose(long_const, 15)
    assert drafts == tokenizer.encode(f'"{long}"', add_special_tokens=False)[:15]
    choice = request(StructuredOutputsParams(choice=["yes", "no"]))
    assert proposer.propose(choice, 4) == []  # two ways on: nothing is forced (and no earlier n-gram)
    repeat = request(StructuredOutputsParams(choice=["yes", "no"]), (5, 6, 7, 5, 6))
    assert proposer.propose(repeat, 4) == [7, 5, 6]  # nothing forced: n-gram lookup
    yes = tokenizer.encode("yes", add_special_tokens=False)
    assert choice.grammar.accept_tokens(yes) == len(yes) and proposer.propose(choice, 4) == []  # only the stop token
    assert choice.grammar.accept_tokens([2]) == 1 and choice.grammar.is_terminated and proposer.propose(choice, 4) == []
    manager.shutdown()


def _requests(temperature: float) -> list[SamplingParams]:
    """Compact JSON requests (long forced runs: keys, separators) and a plain one."""
    schemas = [SCHEMAS[name] for name in ("flat_person", "order_form", "enum_strings", "const_object")]
    params = [SamplingParams(temperature=temperature, seed=i, max_tokens=48,
                             structured_outputs=StructuredOutputsParams(json=s, disable_any_whitespace=True))
              for i, s in enumerate(schemas)]
    return params + [SamplingParams(temperature=temperature, seed=9, max_tokens=24)]


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_grammar_drafts_leave_greedy_outputs_unchanged(tiny_smol_path, async_scheduling):
    """The same greedy tokens with grammar-forced drafts as without; drafts are verified and some accepted."""
    params = _requests(0.0)
    runs = []
    for spec in (None, GRAMMAR):
        llm = LLM(tiny_smol_path, speculative_config=spec, async_scheduling=async_scheduling, **TINY)
        runs.append([o.outputs[0].token_ids for o in llm.chat([PROMPT] * len(params), params, use_tqdm=False)])
        scheduler = llm.engine.scheduler
    assert runs[0] == runs[1]
    assert scheduler.num_drafts > 0 and scheduler.num_accepted_tokens > 0


def test_sampled_outputs_with_grammar_drafts_match_their_schemas(tiny_smol_path):
    """Sampling (temperature 1, seeded) verifies drafts by rejection sampling under the masks: every constrained
    output that finishes with stop parses and validates."""
    import jsonschema
    params = _requests(1.0)
    llm = LLM(tiny_smol_path, speculative_config=GRAMMAR, **TINY)
    outs = llm.chat([PROMPT] * len(params), params, use_tqdm=False)
    finished = 0
    for p, out in zip(params[:-1], outs):
        comp = out.outputs[0]
        if comp.finish_reason == "stop":
            finished += 1
            jsonschema.validate(json.loads(comp.text), p.structured_outputs.json)
    assert finished >= 2 and llm.engine.scheduler.num_drafts > 0


def test_grammar_method_needs_the_tokenizer_and_a_draft_count(tiny_smol_path):
    with pytest.raises(ValueError, match="needs num_speculative_tokens"):
        EngineConfig.from_kwargs(speculative_config={"method": "grammar"})
    spec = EngineConfig.from_kwargs(speculative_config=GRAMMAR).speculative
    assert (spec.prompt_lookup_min, spec.prompt_lookup_max) == (1, 4)  # short n-grams: JSON's separators
    spec = EngineConfig.from_kwargs(speculative_config={**GRAMMAR, "prompt_lookup_max": 3}).speculative
    assert (spec.prompt_lookup_min, spec.prompt_lookup_max) == (3, 3)
    with pytest.raises(ValueError, match="needs the engine's tokenizer"):
        LLM(tiny_smol_path, speculative_config=GRAMMAR, skip_tokenizer_init=True, **TINY)


@pytest.mark.slow
def test_structured_server_suite_passes_with_grammar_drafts():
    """tests/test_server_structured.py (the default model through `vllm-lite serve` and the openai client: chat and
    completions, streaming, n=2, tools, bad input beside a long generation) with its server speculating by method
    "grammar" (conftest's --default-model-server-args)."""
    flag = "--default-model-server-args=--speculative-config " + repr(json.dumps(GRAMMAR))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "tests/test_server_structured.py", flag], cwd=REPO_ROOT, capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, r.stdout[-4000:]
    assert " passed" in r.stdout.splitlines()[-1] and "skipped" not in r.stdout.splitlines()[-1], r.stdout[-500:]


@pytest.mark.slow
def test_grammar_drafts_with_tensor_parallelism(tiny_smol_path):
    """Method "grammar" proposes on the engine core, so it works with two ranks: the greedy tokens of the plain
    single-rank run."""
    params = _requests(0.0)
    runs = []
    for tp, spec in ((1, None), (2, GRAMMAR)):
        llm = LLM(tiny_smol_path, speculative_config=spec, tensor_parallel_size=tp, **TINY)
        try:
            runs.append([o.outputs[0].token_ids for o in llm.chat([PROMPT] * len(params), params, use_tqdm=False)])
            accepted = llm.engine.scheduler.num_accepted_tokens
        finally:
            llm.engine.shutdown()
    assert runs[0] == runs[1] and accepted > 0

