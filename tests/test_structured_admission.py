"""Admission of structured-output requests repeats no work per request: a constraint that passed validation is not
parsed into a grammar again, its compile key is derived once, and neither cache changes what is refused or compiled
(a batch of 256 requests over 8 schemas spent ~0.4 ms per request on this before, docs/PERF.md)."""
from __future__ import annotations

import json

import pytest
import xgrammar as xgr

from vllm_lite.sampling_params import StructuredOutputsParams
from vllm_lite.structured_output.grammar import compile_key
from vllm_lite.structured_output.validate import validate_structured_outputs


@pytest.fixture
def parses(monkeypatch):
    calls = []
    real = xgr.Grammar.from_json_schema

    def counted(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(xgr.Grammar, "from_json_schema", staticmethod(counted))
    return calls


def test_a_validated_schema_is_not_parsed_again(parses):
    schema = {"type": "object", "properties": {"zeta_unique_1": {"type": "integer"}}, "required": ["zeta_unique_1"]}
    for _ in range(5):
        validate_structured_outputs(StructuredOutputsParams(json=schema))
        validate_structured_outputs(StructuredOutputsParams(json=dict(reversed(list(schema.items())))))
    assert len(parses) == 1
    for _ in range(3):
        validate_structured_outputs(StructuredOutputsParams(json=json.dumps(schema)))
    validate_structured_outputs(StructuredOutputsParams(json=schema, disable_any_whitespace=True))
    assert len(parses) == 3  # the text form and the whitespace option are checked once each


def test_refusals_are_not_cached(parses):
    bad = {"type": "object", "properties": {"a_unique_2": {"not": {"type": "string"}}}}
    for _ in range(2):
        with pytest.raises(ValueError, match="'not'"):
            validate_structured_outputs(StructuredOutputsParams(json=bad))
    for _ in range(2):
        with pytest.raises(ValueError, match="regex is invalid"):
            validate_structured_outputs(StructuredOutputsParams(regex="([a-z"))
    with pytest.raises(ValueError, match="non-empty list"):
        validate_structured_outputs(StructuredOutputsParams(choice=[]))
    with pytest.raises(ValueError, match="must be an object or a boolean"):
        validate_structured_outputs(StructuredOutputsParams(json=[1, 2]))


def test_compile_key_keeps_the_property_order_and_options():
    a = {"type": "object", "properties": {"b": {"type": "string"}, "a": {"type": "integer"}}}
    b = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}}
    ka = compile_key(StructuredOutputsParams(json=a), False, False)
    assert ka == compile_key(StructuredOutputsParams(json=a), False, False)
    assert list(json.loads(ka[1])["properties"]) == ["b", "a"]  # generated in the schema's order
    assert ka != compile_key(StructuredOutputsParams(json=b), False, False)
    closed = compile_key(StructuredOutputsParams(json=a), False, True)
    assert json.loads(closed[1])["additionalProperties"] is False and "additionalProperties" not in json.loads(ka[1])
    assert compile_key(StructuredOutputsParams(json=json.dumps(a)), True, False)[2] is False


def test_large_constraints_are_checked_but_not_remembered():
    from vllm_lite.structured_output.validate import CACHED_SPEC_CHARS, _validated
    big = {"type": "object", "properties": {f"p{i}_unique_3": {"type": "integer"} for i in range(6000)}}
    assert len(json.dumps(big)) > CACHED_SPEC_CHARS
    before = _validated.cache_info().currsize
    validate_structured_outputs(StructuredOutputsParams(json=big))
    assert _validated.cache_info().currsize == before  # memory stays bounded by what the cache may hold
    assert compile_key(StructuredOutputsParams(json=big), False, False)[1].startswith('{"type": "object"')
