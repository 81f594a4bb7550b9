"""Tool definitions and tool_choice of a chat request (OpenAI's shapes, vLLM's rules): checked before anything is
rendered (a malformed definition is a 400, never a crash), turned into the JSON schema that constrains the output
for tool_choice "required" or a named function, and assistant/tool messages prepared for the chat template.

"required" constrains the output to a JSON array of calls, `[{"name": ..., "parameters": {...}}, ...]` (vLLM's
format; one item when parallel_tool_calls is false); a named function constrains the output to that function's
arguments object. vllm_lite.entrypoints.openai.tool_parsers turns either output into `tool_calls`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
MAX_TOOLS = 128  # OpenAI's limit
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
TOOL_CHOICES = ("none", "auto", "required")


@dataclass(frozen=True)
class ToolSpec:
    name: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tools mean for generation: `mode` is "none", "auto", "required" or "named"; `schema` is the
    JSON schema constraining the output (required / named only); `name` the named function."""
    mode: str
    tools: tuple[ToolSpec, ...] = ()
    schema: dict[str, Any] | None = None
    name: str | None = None


def parse_tools(tools: Any) -> list[ToolSpec]:
    """ValueError naming the first malformed tool definition (type, name, description, parameters, duplicates)."""
    if not isinstance(tools, list):
        raise ValueError("tools is invalid: it must be a list of tool definitions")
    if len(tools) > MAX_TOOLS:
        raise ValueError(f"tools is invalid: at most {MAX_TOOLS} tools are allowed, got {len(tools)}")
    specs: list[ToolSpec] = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise ValueError(f"{where} is invalid: a tool must be an object")
        if tool.get("type") != "function":
            raise ValueError(f"{where}.type is invalid: only 'function' tools are supported, got "
                             f"{tool.get('type')!r}")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise ValueError(f"{where}.function is invalid: it must be an object with a name")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ValueError(f"{where}.function.name is invalid: {name!r} must be 1 to 64 letters, digits, '_' or "
                             "'-'")
        if fn.get("description") is not None and not isinstance(fn.get("description"), str):
            raise ValueError(f"{where}.function.description is invalid: it must be a string")
        if fn.get("strict") is not None and not isinstance(fn.get("strict"), bool):
            raise ValueError(f"{where}.function.strict is invalid: it must be a boolean")
        params = fn.get("parameters")
        if params is None:
            params = EMPTY_PARAMETERS
        if not isinstance(params, dict):
            raise ValueError(f"{where}.function.parameters is invalid: it must be a JSON schema object")
        if params.get("type", "object") != "object":
            raise ValueError(f"{where}.function.parameters is invalid: the arguments must be an object "
                             f"(type 'object'), got type {params.get('type')!r}")
        if any(s.name == name for s in specs):
            raise ValueError(f"{where}.function.name is invalid: {name!r} is defined twice")
        specs.append(ToolSpec(name, params))
    return specs


def plan_tools(tools: Any, tool_choice: Any, auto_enabled: bool, parallel_tool_calls: bool | None) -> ToolPlan:
    """Resolve tool_choice as vLLM does: absent means "auto" when tools are given ("none" otherwise); "auto" needs
    the server's --enable-auto-tool-choice and --tool-call-parser; a named function must be one of the tools."""
    if tools is None:
        if tool_choice not in (None, "none"):
            raise ValueError("tool_choice is invalid: when tool_choice is set, tools must be set too")
        return ToolPlan("none")
    specs = tuple(parse_tools(tools))
    if tool_choice is None:
        tool_choice = "auto" if specs else "none"
    if isinstance(tool_choice, str):
        if tool_choice not in TOOL_CHOICES:
            raise ValueError(f"tool_choice is invalid: {tool_choice!r} must be 'none', 'auto', 'required' or "
                             "{'type': 'function', 'function': {'name': ...}}")
        if tool_choice == "auto" and not auto_enabled:
            raise ValueError('tool_choice is invalid: "auto" tool choice requires --enable-auto-tool-choice and '
                             "--tool-call-parser to be set on the server")
        if tool_choice == "required":
            if not specs:
                raise ValueError("tool_choice is invalid: 'required' needs at least one tool in tools")
            return ToolPlan("required", specs, required_schema(specs, parallel_tool_calls is not False))
        return ToolPlan(tool_choice, specs)
    if (not isinstance(tool_choice, dict) or tool_choice.get("type") != "function"
            or not isinstance(tool_choice.get("function"), dict)):
        raise ValueError("tool_choice is invalid: a named tool choice is {'type': 'function', 'function': "
                         "{'name': ...}}")
    name = tool_choice["function"].get("name")
    spec = next((s for s in specs if s.name == name), None)
    if spec is None:
        raise ValueError(f"tool_choice is invalid: the function {name!r} is not among the tools")
    return ToolPlan("named", specs, spec.parameters, spec.name)


def required_schema(specs: tuple[ToolSpec, ...], parallel: bool) -> dict[str, Any]:
    """A JSON array of one or more calls, each `{"name": <a tool's name>, "parameters": <its arguments>}`."""
    calls = [{"type": "object", "properties": {"name": {"type": "string", "enum": [s.name]},
                                               "parameters": s.parameters},
              "required": ["name", "parameters"], "additionalProperties": False} for s in specs]
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def template_tool_calls(tool_calls: Any, where: str) -> list[dict[str, Any]]:
    """An assistant message's tool_calls for the chat template, with `arguments` decoded to an object where it is
    JSON (the templates of Qwen/Hermes/Llama serialise it themselves); ValueError for a malformed call."""
    if not isinstance(tool_calls, list):
        raise ValueError(f"{where}.tool_calls is invalid: it must be a list")
    out = []
    for j, call in enumerate(tool_calls):
        at = f"{where}.tool_calls[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ValueError(f"{at} is invalid: it must be {{'id', 'type': 'function', 'function': {{'name', "
                             "'arguments'}}}")
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                pass  # the template gets the text as it is
        elif not isinstance(args, dict):
            raise ValueError(f"{at}.function.arguments is invalid: it must be a JSON string")
        entry = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        out.append(entry)
    return out
