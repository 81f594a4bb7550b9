"""Request fields that constrain the output -> StructuredOutputsParams: OpenAI's `response_format`, vLLM's
`structured_outputs` object and the legacy `guided_*` fields (vLLM ignores those now; here they are aliases so old
clients keep getting constrained output). Shapes are checked here (ValueError naming the field); whether a schema,
regex or grammar compiles is vllm_lite.structured_output.validate's job.
"""
from __future__ import annotations

from typing import Any

import msgspec

from vllm_lite.sampling_params import StructuredOutputsParams

RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")
GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar"}


def response_format_params(rf: dict[str, Any]) -> StructuredOutputsParams | None:
    """{"type": "text"} -> None; {"type": "json_object"}; {"type": "json_schema", "json_schema": {"name",
    "schema", "strict", "description"}}."""
    kind = rf.get("type")
    if kind not in RESPONSE_FORMAT_TYPES:
        raise ValueError(f"response_format.type is invalid: {kind!r} must be one of "
                         f"{', '.join(repr(t) for t in RESPONSE_FORMAT_TYPES)}")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    spec = rf.get("json_schema")
    if not isinstance(spec, dict):
        raise ValueError("response_format.json_schema is invalid: it must be an object with 'name' and 'schema'")
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("response_format.json_schema.name is invalid: it must be a non-empty string")
    schema = spec.get("schema", spec.get("json_schema"))
    if not isinstance(schema, dict):
        raise ValueError("response_format.json_schema.schema is invalid: it must be a JSON schema object")
    if spec.get("strict") is not None and not isinstance(spec.get("strict"), bool):
        raise ValueError("response_format.json_schema.strict is invalid: it must be a boolean")
    return StructuredOutputsParams(json=schema)


def structured_outputs_object(obj: dict[str, Any], where: str = "structured_outputs") -> StructuredOutputsParams:
    """vLLM's `structured_outputs` body field (the offline StructuredOutputsParams' keys)."""
    known = StructuredOutputsParams.__struct_fields__
    unknown = sorted(k for k in obj if k not in known)
    if unknown:
        raise ValueError(f"{where}.{unknown[0]} is not a known field (known: {', '.join(known)})")
    try:
        return msgspec.convert(obj, StructuredOutputsParams)
    except (msgspec.ValidationError, ValueError, TypeError) as exc:
        message = str(exc)
        raise ValueError(message if message.startswith(where) else f"{where} is invalid: {message}") from None


def structured_outputs_of(response_format: dict[str, Any] | None, structured_outputs: dict[str, Any] | None,
                          guided: dict[str, Any]) -> StructuredOutputsParams | None:
    """The one constraint a request asks for (None: unconstrained); two ways of asking at once is a ValueError."""
    found: list[tuple[str, StructuredOutputsParams]] = []
    if response_format is not None:
        params = response_format_params(response_format)
        if params is not None:
            found.append(("response_format", params))
    if structured_outputs is not None:
        found.append(("structured_outputs", structured_outputs_object(structured_outputs)))
    given = {k: v for k, v in guided.items() if v is not None and k in GUIDED_FIELDS}
    if given:
        fields = {GUIDED_FIELDS[k]: v for k, v in given.items()}
        pattern = guided.get("guided_whitespace_pattern")
        if pattern == "":
            fields["disable_any_whitespace"] = True  # "no whitespace" is what xgrammar can express
        elif pattern is not None:
            fields["whitespace_pattern"] = pattern
        found.append((", ".join(given), structured_outputs_object(fields, "/".join(given))))
    if len(found) > 1:
        raise ValueError(f"{found[0][0]} is invalid: only one kind of structured output may be requested, got "
                         f"{' and '.join(name for name, _ in found)}")
    return found[0][1] if found else None


def logit_bias_of(bias: dict[str, Any] | None) -> dict[int, float] | None:
    """OpenAI's {"token id": bias} with string keys -> {id: bias}; SamplingParams checks the ranges."""
    if bias is None:
        return None
    out: dict[int, float] = {}
    for key, value in bias.items():
        try:
            tid = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias is invalid: key {key!r} is not a token id") from None
        out[tid] = value
    return out
