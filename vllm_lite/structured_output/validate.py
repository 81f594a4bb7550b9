"""Syntax and feature checks of a StructuredOutputsParams, before admission (no tokenizer, no grammar compile).

xgrammar parses a JSON schema, regex or EBNF grammar into a Grammar in well under a millisecond without the
vocabulary; what it cannot parse, and the JSON-schema keywords it would silently ignore (so an output could break
the schema), are refused here with a ValueError that names the problem (the server answers 400).
"""
from __future__ import annotations

import functools
import json
import re
from typing import Any

from vllm_lite.sampling_params import StructuredOutputsParams

# Keywords xgrammar accepts but does not enforce: an output could violate them, so they are refused.
_UNSUPPORTED_KEYWORDS = {
    "not": "'not'", "if": "'if'/'then'/'else'", "then": "'if'/'then'/'else'", "else": "'if'/'then'/'else'",
    "uniqueItems": "'uniqueItems'", "contains": "'contains'", "minContains": "'minContains'",
    "maxContains": "'maxContains'", "dependentRequired": "'dependentRequired'",
    "dependentSchemas": "'dependentSchemas'", "dependencies": "'dependencies'",
}
_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
_COUNTS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_ONE = ("items", "additionalProperties", "propertyNames", "unevaluatedProperties", "unevaluatedItems",
               "additionalItems")
# Formats xgrammar leaves as plain strings although validators check them: refused.
_UNSUPPORTED_FORMATS = frozenset({"regex", "idn-email", "idn-hostname"})
# Formats xgrammar enforces more loosely than RFC 3339 / Python's ipaddress (Feb 31, second 60, "082" in an
# address): compiled as these stricter patterns instead (see strict_formats).
_LEAP_YEAR = "([0-9]{2}(0[48]|[2468][048]|[13579][26])|([02468][048]|[13579][26])00)"
_DATE = ("(([0-9]{4}-((0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])|(0[469]|11)-(0[1-9]|[12][0-9]|30)|"
         "02-(0[1-9]|1[0-9]|2[0-8])))|" + _LEAP_YEAR + "-02-29)")
# (No fractional seconds: RFC 3339 makes them optional, and the grammar stays small.)
_TIME = "([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"
_OCTET = "(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
STRICT_FORMAT_PATTERNS = {
    "date": f"^{_DATE}$", "time": f"^{_TIME}$", "date-time": f"^{_DATE}T{_TIME}$",
    "ipv4": f"^({_OCTET}\\.){{3}}{_OCTET}$",
}
MAX_SCHEMA_DEPTH = 64  # nesting deeper than any real schema; deeper ones would only strain the compiler
MAX_SPEC_CHARS = 1 << 20  # 1 MiB of schema / regex / grammar text
CACHED_SPEC_CHARS = 1 << 16  # constraints up to 64 KiB of text are remembered once checked (bounded memory)


def validate_structured_outputs(params: StructuredOutputsParams) -> None:
    """Raise ValueError naming the problem when `params` cannot be compiled into a grammar that xgrammar fully
    enforces: invalid JSON / JSON schema, unsupported schema keywords, a bad regex or EBNF grammar, an empty
    choice list, or an option the xgrammar backend cannot honour.

    A constraint that passed is remembered by its text (`_validated`, texts up to CACHED_SPEC_CHARS): a batch repeats
    a few schemas many times, and each check parses the schema into a grammar (~0.2 ms; the LLM and the engine core
    both check every request)."""
    if params.whitespace_pattern is not None:
        raise ValueError("structured_outputs.whitespace_pattern is not supported by the xgrammar backend; use "
                         "disable_any_whitespace to forbid whitespace instead")
    kind = params.kind
    if kind == "json_object":
        if params.json_object is not True:
            raise ValueError(f"structured_outputs.json_object must be true or false, got {params.json_object!r}")
        return
    spec = choice_ebnf(params.choice) if kind == "choice" else getattr(params, kind)
    text, from_object = spec, False
    if kind == "json" and isinstance(spec, (dict, bool)):
        try:
            text, from_object = json.dumps(spec, sort_keys=True), True
        except (TypeError, ValueError, RecursionError):  # not JSON: the full check below says why
            text = None
    if isinstance(text, str) and len(text) <= CACHED_SPEC_CHARS:
        _validated(kind, text, from_object, params.disable_any_whitespace)
    else:
        _validate(kind, spec, params.disable_any_whitespace)


@functools.lru_cache(maxsize=1024)
def _validated(kind: str, text: str, from_object: bool, disable_any_whitespace: bool) -> None:
    """`_validate` of a constraint's text (from_object: a schema object's JSON, parsed back); only constraints that
    pass are cached (an exception is not)."""
    _validate(kind, json.loads(text) if from_object else text, disable_any_whitespace)


def _validate(kind: str, spec: Any, disable_any_whitespace: bool) -> None:
    import xgrammar as xgr

    try:
        if kind == "json":
            schema = load_schema(spec)
            xgr.Grammar.from_json_schema(json.dumps(prepare_schema(schema)),
                                         any_whitespace=not disable_any_whitespace)
        elif kind == "regex":
            _check_text("regex", spec)
            xgr.Grammar.from_regex(spec)
        elif kind == "grammar":
            _check_text("grammar", spec)
            xgr.Grammar.from_ebnf(spec)
        else:  # choice, as its EBNF grammar
            xgr.Grammar.from_ebnf(spec)
    except RuntimeError as exc:  # xgrammar's parse errors
        raise ValueError(f"structured_outputs.{kind} is invalid: {xgrammar_message(exc)}") from None


def load_schema(spec: str | dict[str, Any] | None) -> dict[str, Any] | bool:
    """The JSON schema of a `json` constraint as a Python object, checked for what xgrammar would not enforce."""
    if isinstance(spec, str):
        _check_text("json", spec)
        try:
            schema = json.loads(spec)
        except (ValueError, RecursionError) as exc:
            raise ValueError(f"structured_outputs.json is not valid JSON: {exc}") from None
    else:
        schema = spec
    if not isinstance(schema, (dict, bool)):
        raise ValueError(f"structured_outputs.json is invalid: a JSON schema must be an object or a boolean, got "
                         f"{type(schema).__name__}")
    _check_schema(schema, "#", 0, schema)
    return schema


def _check_text(name: str, text: object) -> None:
    if not isinstance(text, str) or not text:
        raise ValueError(f"structured_outputs.{name} is invalid: it must be a non-empty string")
    if len(text) > MAX_SPEC_CHARS:
        raise ValueError(f"structured_outputs.{name} is invalid: {len(text)} characters, more than the limit of "
                         f"{MAX_SPEC_CHARS}")


def _check_schema(schema: Any, where: str, depth: int, root: Any) -> None:
    """Walk every subschema: keyword shapes xgrammar does not check itself, and unsupported keywords."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise ValueError(f"structured_outputs.json is invalid at {where}: a schema must be an object or a boolean")
    if depth > MAX_SCHEMA_DEPTH:
        raise ValueError(f"structured_outputs.json is invalid: schemas nested deeper than {MAX_SCHEMA_DEPTH} levels "
                         f"are not supported")
    for key in schema:
        if key in _UNSUPPORTED_KEYWORDS and not (key == "uniqueItems" and schema[key] is False):
            raise ValueError(f"structured_outputs.json uses {_UNSUPPORTED_KEYWORDS[key]} at {where}, which the "
                             f"xgrammar backend cannot enforce")
    if "allOf" in schema and isinstance(schema["allOf"], list) and len(schema["allOf"]) > 1:
        raise ValueError(f"structured_outputs.json uses 'allOf' with {len(schema['allOf'])} subschemas at {where}; "
                         f"the xgrammar backend supports at most one")
    one_of = schema.get("oneOf")
    if isinstance(one_of, list) and len(one_of) > 1 and not _disjoint(one_of, root):
        raise ValueError(f"structured_outputs.json uses 'oneOf' at {where} with branches that may overlap (an output "
                         f"could match several, which oneOf forbids, and xgrammar enforces only 'any of'); use "
                         f"anyOf, or make the branches disjoint: different types, or a required property with "
                         f"different const values")
    ref = schema.get("$ref")
    if ref is not None and not (isinstance(ref, str) and ref.startswith("#")):
        raise ValueError(f"structured_outputs.json uses $ref {ref!r} at {where}: only references within the schema "
                         f"('#/$defs/...') are supported (nothing is fetched, and xgrammar would let any value through)")
    fmt, pattern = schema.get("format"), schema.get("pattern")
    if pattern is not None:
        _check_pattern(pattern, f"{where}/pattern")
    pattern_properties = schema.get("patternProperties")
    if isinstance(pattern_properties, dict):
        for key in pattern_properties:
            _check_pattern(key, f"{where}/patternProperties")
    if fmt in _UNSUPPORTED_FORMATS:
        raise ValueError(f"structured_outputs.json uses format {fmt!r} at {where}, which the xgrammar backend "
                         f"cannot enforce")
    if fmt is not None and pattern is not None:
        raise ValueError(f"structured_outputs.json combines 'format' and 'pattern' at {where}; the xgrammar backend "
                         f"enforces only one of them")
    if (fmt is not None or pattern is not None) and ("minLength" in schema or "maxLength" in schema):
        raise ValueError(f"structured_outputs.json combines minLength/maxLength with "
                         f"{'format' if fmt is not None else 'pattern'} at {where}; the xgrammar backend cannot "
                         f"enforce both (put the length into the pattern, e.g. ^[a-z]{{1,8}}$)")
    types = schema.get("type")
    for t in types if isinstance(types, list) else [types] if types is not None else []:
        if t not in _TYPES:
            raise ValueError(f"structured_outputs.json is invalid at {where}: unknown type {t!r} (allowed: "
                             f"{', '.join(sorted(_TYPES))})")
    for key in _COUNTS:
        value = schema.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"structured_outputs.json is invalid at {where}: {key} must be a non-negative integer, "
                             f"got {value!r}")
    required = schema.get("required")
    if required is not None and not (isinstance(required, list) and all(isinstance(r, str) for r in required)):
        raise ValueError(f"structured_outputs.json is invalid at {where}: required must be a list of property names")
    for key in _SCHEMA_MAPS:
        sub = schema.get(key)
        if sub is None:
            continue
        if not isinstance(sub, dict):
            raise ValueError(f"structured_outputs.json is invalid at {where}: {key} must be an object")
        for name, child in sub.items():
            _check_schema(child, f"{where}/{key}/{name}", depth + 1, root)
    for key in _SCHEMA_LISTS:
        sub = schema.get(key)
        if sub is None:
            continue
        if not isinstance(sub, list) or (not sub and key != "prefixItems"):
            raise ValueError(f"structured_outputs.json is invalid at {where}: {key} must be a non-empty list of "
                             f"schemas")
        for i, child in enumerate(sub):
            _check_schema(child, f"{where}/{key}/{i}", depth + 1, root)
    for key in _SCHEMA_ONE:
        if key in schema:
            _check_schema(schema[key], f"{where}/{key}", depth + 1, root)


def _check_pattern(pattern: Any, where: str) -> None:
    """A schema's regular expression, checked with xgrammar's regex parser: inside a JSON schema xgrammar skips what
    it cannot enforce (a lookahead, a flag group) and lets strings through that the pattern refuses."""
    import xgrammar as xgr

    if not isinstance(pattern, str):
        raise ValueError(f"structured_outputs.json is invalid at {where}: a pattern must be a string")
    try:
        xgr.Grammar.from_regex(pattern)
    except RuntimeError as exc:
        raise ValueError(f"structured_outputs.json is invalid at {where}: {xgrammar_message(exc)}") from None


def _optional_groups_as_counts(pattern: str) -> str:
    """`(...)?` written as `(...){0,1}`: xgrammar 0.2.9 converts an optional group inside a JSON-string pattern
    wrongly (`a(b[0-9]+)?` lets "a123" through), the counted form correctly."""
    out: list[str] = []
    i, in_class = 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            out.append(pattern[i: i + 2])
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
            if pattern[i + 1: i + 2] == "]":  # "[]...]": a leading "]" is a member
                out.append("[]")
                i += 2
                continue
        elif c == ")" and pattern[i + 1: i + 2] == "?":
            out.append("){0,1}")
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


def _resolve(node: Any, root: Any) -> Any:
    """A local "$ref" ("#/$defs/x") followed to its target (None when it does not resolve)."""
    for _ in range(16):
        ref = node.get("$ref") if isinstance(node, dict) else None
        if not (isinstance(ref, str) and ref.startswith("#")):
            return node
        node = root
        for part in ref[1:].split("/")[1:]:
            node = node.get(part.replace("~1", "/").replace("~0", "~")) if isinstance(node, dict) else None
    return None


def _json_types(value: Any) -> set[str]:
    if isinstance(value, bool):
        return {"boolean"}
    if isinstance(value, (int, float)):
        return {"number", "integer"} if float(value).is_integer() else {"number"}
    return {{str: "string", type(None): "null", list: "array", dict: "object"}.get(type(value), "?")}


def _types(branch: Any) -> set[str] | None:
    """The JSON types a schema admits (None: not known from its keywords, so assumed to overlap anything)."""
    if not isinstance(branch, dict):
        return None
    if "const" in branch:
        return _json_types(branch["const"])
    if isinstance(branch.get("enum"), list):
        return set().union(*(_json_types(v) for v in branch["enum"])) if branch["enum"] else None
    t = branch.get("type")
    types = {t} if isinstance(t, str) else set(t) if isinstance(t, list) else {"object"} if "properties" in branch \
        else None
    if types and types & {"integer", "number"}:
        types |= {"integer", "number"}  # integers are numbers
    return types


def _values(branch: Any) -> set[str] | None:
    """The values a const / enum schema admits (as JSON text), else None."""
    if isinstance(branch, dict) and "const" in branch:
        return {json.dumps(branch["const"], sort_keys=True)}
    if isinstance(branch, dict) and isinstance(branch.get("enum"), list):
        return {json.dumps(v, sort_keys=True) for v in branch["enum"]}
    return None


def _pairwise_disjoint(sets: list[set[str] | None]) -> bool:
    return all(s is not None for s in sets) and all(not (a & b) for i, a in enumerate(sets) for b in sets[i + 1:])


def _disjoint(branches: list[Any], root: Any) -> bool:
    """Whether no value can match two oneOf branches: different types, different const / enum values, or objects
    with a required property whose const / enum values differ (a discriminator)."""
    resolved = [_resolve(b, root) for b in branches]
    if _pairwise_disjoint([_types(b) for b in resolved]) or _pairwise_disjoint([_values(b) for b in resolved]):
        return True
    if not all(isinstance(b, dict) and isinstance(b.get("properties"), dict) for b in resolved):
        return False
    common = set.intersection(*(set(b.get("required") or ()) for b in resolved))
    return any(_pairwise_disjoint([_values(_resolve(b["properties"].get(p), root)) for b in resolved])
               for p in sorted(common))


def prepare_schema(schema: Any, close_objects: bool = False) -> Any:
    """The schema xgrammar compiles: a copy where each date / time / date-time / ipv4 format is the equivalent
    strict pattern, string lengths become a pattern of plain characters, optional groups in patterns are counted,
    and, with close_objects
    (disable_additional_properties), every object schema without its own additionalProperties gets false."""
    if isinstance(schema, list):
        return [prepare_schema(s, close_objects) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: prepare_schema(v, close_objects) if k not in ("enum", "const", "default", "examples") else v
           for k, v in schema.items()}
    fmt = out.get("format")
    if isinstance(fmt, str) and fmt in STRICT_FORMAT_PATTERNS and "pattern" not in out:
        del out["format"]
        out["pattern"] = STRICT_FORMAT_PATTERNS[fmt]
    if isinstance(out.get("pattern"), str):
        out["pattern"] = _optional_groups_as_counts(out["pattern"])
    if ("minLength" in out or "maxLength" in out) and "pattern" not in out and "format" not in out:
        # xgrammar's length-bounded strings admit raw control characters (invalid JSON): a pattern instead.
        low, high = out.pop("minLength", 0), out.pop("maxLength", "")
        out["pattern"] = f'^[^"\\\\\\x00-\\x1f]{{{low},{high}}}$'
    if close_objects and (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def choice_ebnf(choices: list[str] | None) -> str:
    """An EBNF grammar whose language is exactly the given strings."""
    if not isinstance(choices, list) or not choices:
        raise ValueError("structured_outputs.choice is invalid: it must be a non-empty list of strings")
    for c in choices:
        if not isinstance(c, str) or not c:
            raise ValueError(f"structured_outputs.choice is invalid: {c!r} is not a non-empty string")
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in dict.fromkeys(choices))


_XGR_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:\d+: ")


def xgrammar_message(exc: BaseException) -> str:
    """xgrammar's error text without its timestamp and C++ source location."""
    return _XGR_PREFIX.sub("", str(exc).strip()).strip() or type(exc).__name__
