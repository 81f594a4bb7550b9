"""JSON schemas, regexes, choices and EBNF grammars for tests/test_structured_outputs.py and bench/structured.py.

SCHEMAS: valid schemas covering nested objects, arrays with min/max items, enums, const, anyOf/oneOf, $ref/$defs,
string patterns and formats, integer/number bounds, additionalProperties false and optional fields. Strings are
mostly bounded (maxLength, pattern, enum, format) so that a random model, which picks among all allowed tokens,
finishes its objects within a test's token budget. INVALID: constraints validate_structured_outputs must refuse,
each with a piece of the expected message.
"""
from __future__ import annotations

from typing import Any

_NAME = {"type": "string", "minLength": 1, "maxLength": 12}
_SHORT = {"type": "string", "maxLength": 8}

SCHEMAS: dict[str, dict[str, Any]] = {
    "flat_person": {"type": "object", "properties": {"name": _NAME, "age": {"type": "integer", "minimum": 0,
                                                                              "maximum": 120}},
                    "required": ["name", "age"], "additionalProperties": False},
    "optional_fields": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999},
                                                         "nick": _SHORT, "active": {"type": "boolean"}},
                        "required": ["id"], "additionalProperties": False},
    "all_optional": {"type": "object", "properties": {"a": {"type": "boolean"}, "b": {"type": "null"}},
                     "additionalProperties": False},
    "nested_object": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"name": _NAME, "address": {
            "type": "object", "properties": {"city": _SHORT, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"], "additionalProperties": False}},
                 "required": ["name", "address"], "additionalProperties": False}},
                      "required": ["user"], "additionalProperties": False},
    "array_min_max": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                      "minItems": 2, "maxItems": 4},
    "array_exact": {"type": "array", "items": {"type": "boolean"}, "minItems": 3, "maxItems": 3},
    "array_of_objects": {"type": "object", "properties": {"items": {
        "type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
                                             "qty": {"type": "integer", "minimum": 1, "maximum": 50}},
            "required": ["sku", "qty"], "additionalProperties": False}}},
                         "required": ["items"], "additionalProperties": False},
    "nested_arrays": {"type": "array", "minItems": 1, "maxItems": 2,
                      "items": {"type": "array", "minItems": 1, "maxItems": 2,
                                "items": {"type": "integer", "minimum": -5, "maximum": 5}}},
    "empty_array_allowed": {"type": "object", "properties": {"tags": {"type": "array", "items": _SHORT,
                                                                      "maxItems": 2}},
                            "required": ["tags"], "additionalProperties": False},
    "enum_strings": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
                     "required": ["color"], "additionalProperties": False},
    "enum_mixed": {"enum": ["a", 1, True, None, 2.5]},
    "enum_in_array": {"type": "array", "items": {"enum": ["x", "y"]}, "minItems": 1, "maxItems": 3},
    "const_value": {"type": "object", "properties": {"version": {"const": "1.0"}, "kind": {"const": 7}},
                    "required": ["version", "kind"], "additionalProperties": False},
    "const_object": {"const": {"ok": True, "n": [1, 2]}},
    "anyof_types": {"type": "object", "properties": {"value": {"anyOf": [
        {"type": "integer", "minimum": 0, "maximum": 100}, {"type": "boolean"}, {"type": "null"}]}},
                    "required": ["value"], "additionalProperties": False},
    "anyof_objects": {"anyOf": [
        {"type": "object", "properties": {"cat": _SHORT}, "required": ["cat"], "additionalProperties": False},
        {"type": "object", "properties": {"dog": {"type": "integer", "minimum": 0, "maximum": 3}},
         "required": ["dog"], "additionalProperties": False}]},
    "oneof_discriminated": {"oneOf": [
        {"type": "object", "properties": {"kind": {"const": "circle"},
                                          "r": {"type": "integer", "minimum": 1, "maximum": 9}},
         "required": ["kind", "r"], "additionalProperties": False},
        {"type": "object", "properties": {"kind": {"const": "square"},
                                          "side": {"type": "integer", "minimum": 1, "maximum": 9}},
         "required": ["kind", "side"], "additionalProperties": False}]},
    "oneof_types": {"oneOf": [{"type": "string", "maxLength": 4}, {"type": "integer", "minimum": 0,
                                                                     "maximum": 10}]},
    "oneof_ref_discriminator": {"$defs": {
        "cat": {"type": "object", "properties": {"pet": {"const": "cat"}, "lives": {"type": "integer", "minimum": 1,
                                                                                    "maximum": 9}},
                "required": ["pet", "lives"], "additionalProperties": False},
        "dog": {"type": "object", "properties": {"pet": {"const": "dog"}, "good": {"type": "boolean"}},
                "required": ["pet", "good"], "additionalProperties": False}},
        "oneOf": [{"$ref": "#/$defs/cat"}, {"$ref": "#/$defs/dog"}], "discriminator": {"propertyName": "pet"}},
    "ref_defs": {"$defs": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": -9, "maximum": 9}, "y": {"type": "integer", "minimum": -9, "maximum": 9}},
        "required": ["x", "y"], "additionalProperties": False}},
                 "type": "object", "properties": {"a": {"$ref": "#/$defs/point"}, "b": {"$ref": "#/$defs/point"}},
                 "required": ["a", "b"], "additionalProperties": False},
    "ref_definitions": {"definitions": {"tag": {"type": "string", "pattern": "^#[a-z]{1,6}$"}},
                        "type": "array", "items": {"$ref": "#/definitions/tag"}, "minItems": 1, "maxItems": 3},
    "ref_nested_defs": {"$defs": {"name": _NAME, "person": {"type": "object", "properties": {
        "first": {"$ref": "#/$defs/name"}, "last": {"$ref": "#/$defs/name"}}, "required": ["first", "last"],
        "additionalProperties": False}},
                        "type": "object", "properties": {"owner": {"$ref": "#/$defs/person"}},
                        "required": ["owner"], "additionalProperties": False},
    "pattern_code": {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{2}$"}},
                     "required": ["code"], "additionalProperties": False},
    "pattern_phone": {"type": "string", "pattern": "^\\+[0-9]{2} [0-9]{3}-[0-9]{4}$"},
    "pattern_alternation": {"type": "string", "pattern": "^(yes|no|maybe)$"},
    "pattern_optional_groups": {"type": "object", "properties": {
        "price": {"type": "string", "pattern": "^[1-9][0-9]*(\\.[0-9]+)?$"},
        "ref": {"type": "string", "pattern": "^A(-[0-9]+)?(/[a-z]+)?$"}}, "required": ["price", "ref"],
                                "additionalProperties": False},
    "format_date": {"type": "object", "properties": {"day": {"type": "string", "format": "date"}},
                    "required": ["day"], "additionalProperties": False},
    "format_time": {"type": "string", "format": "time"},
    "format_datetime": {"type": "object", "properties": {"at": {"type": "string", "format": "date-time"}},
                        "required": ["at"], "additionalProperties": False},
    "format_ipv6": {"type": "string", "format": "ipv6"},
    "format_uuid": {"type": "string", "format": "uuid"},
    "format_ipv4": {"type": "object", "properties": {"ip": {"type": "string", "format": "ipv4"}},
                    "required": ["ip"], "additionalProperties": False},
    "string_length": {"type": "string", "minLength": 3, "maxLength": 5},
    "integer_bounds": {"type": "integer", "minimum": 10, "maximum": 99},
    "integer_exclusive": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 5},
    "negative_range": {"type": "integer", "minimum": -50, "maximum": -10},
    "number_bounds": {"type": "object", "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1}},
                      "required": ["score"], "additionalProperties": False},
    "boolean_only": {"type": "boolean"},
    "null_only": {"type": "null"},
    "nullable": {"type": "object", "properties": {"note": {"type": ["string", "null"], "maxLength": 6}},
                 "required": ["note"], "additionalProperties": False},
    "tuple_prefix_items": {"type": "array", "prefixItems": [{"type": "integer", "minimum": 0, "maximum": 9},
                                                            {"enum": ["a", "b"]}, {"type": "boolean"}],
                           "items": False, "minItems": 3},
    "additional_false_many": {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 9}, "b": {"type": "boolean"},
        "c": {"enum": ["u", "v"]}, "d": {"type": "null"}}, "required": ["a", "b", "c", "d"],
        "additionalProperties": False},
    "deep_nesting": {"type": "object", "properties": {"l1": {"type": "object", "properties": {"l2": {
        "type": "object", "properties": {"l3": {"type": "object", "properties": {"v": {"type": "boolean"}},
                                                "required": ["v"], "additionalProperties": False}},
        "required": ["l3"], "additionalProperties": False}}, "required": ["l2"], "additionalProperties": False}},
                     "required": ["l1"], "additionalProperties": False},
    "min_max_properties": {"type": "object", "properties": {"p": {"type": "boolean"}, "q": {"type": "boolean"},
                                                            "r": {"type": "boolean"}},
                           "minProperties": 2, "additionalProperties": False},
    "order_form": {"type": "object", "properties": {
        "order_id": {"type": "string", "pattern": "^ORD-[0-9]{4}$"},
        "status": {"enum": ["new", "paid", "shipped"]},
        "total": {"type": "integer", "minimum": 0, "maximum": 10000},
        "express": {"type": "boolean"}}, "required": ["order_id", "status", "total"],
                   "additionalProperties": False},
    "event": {"type": "object", "properties": {
        "title": _NAME, "date": {"type": "string", "format": "date"},
        "attendees": {"type": "array", "items": _SHORT, "minItems": 1, "maxItems": 2}},
              "required": ["title", "date", "attendees"], "additionalProperties": False},
}

# Schemas an instruction-tuned model answers with a sensible object (the real default model, greedy).
REAL_MODEL_SCHEMAS = ["flat_person", "enum_strings", "array_of_objects", "ref_defs", "order_form", "event"]

REGEXES = ["[0-9]{3}-[0-9]{4}", "(cat|dog|bird)s?", "[A-Z][a-z]{2,6}", "0x[0-9a-f]{4}", "(ab|cd){2,3}!"]
CHOICES = [["yes", "no"], ["red", "green", "blue", "dark blue"], ["Paris", "Lyon", "Nice"]]
GRAMMARS = {
    "sum": ('root ::= num " + " num\nnum ::= [1-9] [0-9]?', r"[1-9][0-9]? \+ [1-9][0-9]?"),
    "greeting": ('root ::= ("hello" | "hi") " " name "!"\nname ::= [a-z]{2,5}', r"(hello|hi) [a-z]{2,5}!"),
    "list": ('root ::= "[" item ("," item)* "]"\nitem ::= [a-c]', r"\[[a-c](,[a-c])*\]"),
}

# (structured_outputs kwargs, a piece of the expected ValueError message)
INVALID: list[tuple[dict[str, Any], str]] = [
    ({"json": {"type": "foo"}}, "unknown type 'foo'"),
    ({"json": {"type": ["string", "bogus"]}}, "unknown type 'bogus'"),
    ({"json": '{"type": "object", '}, "not valid JSON"),
    ({"json": "[1, 2]"}, "must be an object or a boolean"),
    ({"json": {"type": "integer", "minimum": 5, "maximum": 2}}, "minimum greater than maximum"),
    ({"json": {"type": "array", "minItems": 3, "maxItems": 1}}, "minItems is greater than maxItems"),
    ({"json": {"type": "string", "pattern": "[a-"}}, "Unclosed"),
    ({"json": {"$ref": "#/$defs/missing"}}, "missing"),
    ({"json": {"$ref": "https://example.com/person.json"}}, "only references within the schema"),
    ({"json": {"type": "string", "pattern": "^(?=.*[0-9]).+$"}}, "Lookahead"),
    ({"json": {"type": "string", "pattern": "(?i)yes"}}, "#/pattern"),
    ({"json": {"type": "object", "patternProperties": {"(?!x)": {"type": "string"}}}}, "#/patternProperties"),
    ({"json": {"type": "object", "properties": {"p": {"type": "string", "pattern": 7}}}}, "a pattern must be a string"),
    ({"json": {"type": "object", "required": "name"}}, "required must be a list"),
    ({"json": {"type": "object", "properties": "x"}}, "properties must be an object"),
    ({"json": {"enum": []}}, "enum"),
    ({"json": {"type": "string", "minLength": -1}}, "minLength must be a non-negative integer"),
    ({"json": {"type": "integer", "multipleOf": 0}}, "multipleOf"),
    ({"json": {"not": {"type": "string"}}}, "'not'"),
    ({"json": {"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}}, "'if'/'then'/'else'"),
    ({"json": {"type": "array", "uniqueItems": True}}, "'uniqueItems'"),
    ({"json": {"type": "array", "contains": {"const": 1}}}, "'contains'"),
    ({"json": {"type": "object", "dependentRequired": {"a": ["b"]}}}, "'dependentRequired'"),
    ({"json": {"allOf": [{"type": "string"}, {"maxLength": 3}]}}, "'allOf'"),
    ({"json": {"anyOf": []}}, "anyOf must be a non-empty list"),
    ({"json": {"type": "string", "format": "email", "maxLength": 24}}, "combines minLength/maxLength with format"),
    ({"json": {"type": "string", "pattern": "^[a-z]+$", "maxLength": 5}}, "combines minLength/maxLength with pattern"),
    ({"json": {"type": "string", "format": "date", "pattern": "^2020"}}, "combines 'format' and 'pattern'"),
    ({"json": {"type": "string", "format": "regex"}}, "format 'regex'"),
    ({"json": {"oneOf": [{"type": "integer"}, {"type": "number"}]}}, "'oneOf' at # with branches that may overlap"),
    ({"json": {"type": "object", "properties": {"v": {"oneOf": [{"enum": ["a", "b"]}, {"enum": ["b"]}]}}}},
     "'oneOf' at #/properties/v"),
    ({"regex": "[a-"}, "Unclosed"),
    ({"regex": "(ab"}, "parenthesis"),
    ({"regex": "a{3,1}"}, "3 > 1"),
    ({"regex": "(?<=a)b"}, "Lookbehind"),
    ({"regex": ""}, "non-empty string"),
    ({"grammar": "root ::= foo"}, 'Rule "foo" is not defined'),
    ({"grammar": 'x ::= "a"'}, 'root rule'),
    ({"grammar": 'root ::= "a" |'}, "EBNF parser error"),
    ({"choice": []}, "non-empty list"),
    ({"choice": ["ok", ""]}, "not a non-empty string"),
    ({"json": {"type": "string"}, "whitespace_pattern": " *"}, "whitespace_pattern"),
]
