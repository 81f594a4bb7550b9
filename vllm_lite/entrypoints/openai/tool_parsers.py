"""Generated text -> OpenAI `tool_calls`, whole (non-streaming) and incrementally (streaming), for the three ways a
chat request calls tools (tools.ToolPlan.mode):

- "named": the output is the arguments object of the named function (constrained by its schema);
- "required": the output is a JSON array of `{"name", "parameters"}` calls (constrained by tools.required_schema);
- "auto" with the hermes parser: the model writes `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
  blocks (Qwen2.5/Qwen3/Hermes templates); text before the first block is the message content. A block that is not
  valid JSON leaves the whole text as content (vLLM's behaviour).

Streaming parsers return the same calls as the whole-text functions; a "required" or hermes call is streamed as
one delta when it is complete (id, name and all its arguments), a named call streams its arguments as they are
generated.
"""
from __future__ import annotations

import json
import re
import uuid
from typing import Any

from vllm_lite.entrypoints.openai.protocol import DeltaFunctionCall, DeltaToolCall, FunctionCall, ToolCall

HERMES_START, HERMES_END = "<tool_call>", "</tool_call>"
_HERMES_RE = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)\Z", re.DOTALL)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call(name: str, arguments: Any) -> ToolCall:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return ToolCall(id=new_call_id(), function=FunctionCall(name=name, arguments=text))


def _decoded_call(obj: Any, args_key: str) -> ToolCall | None:
    """{"name": str, args_key: object} -> a ToolCall; None for anything else."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, {})
    if not isinstance(args, (dict, str)):
        return None
    return _call(obj["name"], args)


def parse_named(text: str, name: str) -> list[ToolCall]:
    return [_call(name, text)]


def parse_required(text: str) -> list[ToolCall]:
    """The complete calls of a `[{"name", "parameters"}, ...]` output (those before the cut when max_tokens ended
    it mid-array: what the streaming parser emits too)."""
    parser = RequiredStreamParser()
    deltas = parser.feed(text)[1]
    return [ToolCall(id=d.id, function=FunctionCall(name=d.function.name, arguments=d.function.arguments))
            for d in deltas]


def parse_hermes(text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a hermes-format output; (text, []) when it holds no block or a block is not a call."""
    if HERMES_START not in text:
        return text, []
    calls = []
    for m in _HERMES_RE.finditer(text):
        try:
            call = _decoded_call(json.loads(m.group(1) if m.group(1) is not None else m.group(2)), "arguments")
        except json.JSONDecodeError:
            call = None
        if call is None:
            return text, []
        calls.append(call)
    content = text[:text.index(HERMES_START)]
    return content or None, calls


def parse_tool_calls(mode: str, text: str, name: str | None) -> tuple[str | None, list[ToolCall]]:
    """(content, tool calls) of a finished choice; mode "none" (or an unparsable output) keeps the text as content."""
    if mode == "named":
        return None, parse_named(text, name or "")
    if mode == "required":
        calls = parse_required(text)
        return (None, calls) if calls else (text, [])
    if mode == "auto":
        return parse_hermes(text)
    return text, []


def _delta(index: int, call: ToolCall) -> DeltaToolCall:
    return DeltaToolCall(index=index, id=call.id, type="function",
                         function=DeltaFunctionCall(name=call.function.name, arguments=call.function.arguments))


class StreamParser:
    """Plain text: everything is content. Subclasses turn text deltas into tool-call deltas."""

    def __init__(self) -> None:
        self.num_calls = 0

    def feed(self, delta: str) -> tuple[str, list[DeltaToolCall]]:
        """(content delta, tool-call deltas) for the next piece of generated text."""
        return delta, []

    def finish(self) -> tuple[str, list[DeltaToolCall]]:
        """What is still held back when the choice finishes."""
        return "", []


class NamedStreamParser(StreamParser):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def feed(self, delta: str) -> tuple[str, list[DeltaToolCall]]:
        if self.num_calls == 0:
            self.num_calls = 1
            return "", [_delta(0, ToolCall(id=new_call_id(), function=FunctionCall(name=self.name, arguments=delta)))]
        if not delta:
            return "", []
        return "", [DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=delta))]


class RequiredStreamParser(StreamParser):
    """Emits each array item as soon as it is a complete JSON value."""

    def __init__(self) -> None:
        super().__init__()
        self.buffer = ""
        self.pos = 0
        self.decoder = json.JSONDecoder()
        self.started = False

    def feed(self, delta: str) -> tuple[str, list[DeltaToolCall]]:
        self.buffer += delta
        out = []
        while True:
            while self.pos < len(self.buffer) and (self.buffer[self.pos] in " \t\r\n,"
                                                   or (self.buffer[self.pos] == "[" and not self.started)):
                self.started |= self.buffer[self.pos] == "["
                self.pos += 1
            if not self.started or self.pos >= len(self.buffer) or self.buffer[self.pos] == "]":
                return "", out
            try:
                item, end = self.decoder.raw_decode(self.buffer, self.pos)
            except json.JSONDecodeError:
                return "", out  # the item is not complete yet
            self.pos = end
            call = _decoded_call(item, "parameters")
            if call is not None:
                out.append(_delta(self.num_calls, call))
                self.num_calls += 1


class HermesStreamParser(StreamParser):
    """Content until the first `<tool_call>` (a possible start of it is held back), then one delta per complete
    block; text after the first block is dropped, as the non-streaming parser does."""

    def __init__(self) -> None:
        super().__init__()
        self.buffer = ""
        self.in_calls = False

    def feed(self, delta: str) -> tuple[str, list[DeltaToolCall]]:
        self.buffer += delta
        if not self.in_calls:
            at = self.buffer.find(HERMES_START)
            if at < 0:
                keep = _partial_suffix(self.buffer, HERMES_START)
                content, self.buffer = self.buffer[:len(self.buffer) - keep], self.buffer[len(self.buffer) - keep:]
                return content, []
            content, self.buffer = self.buffer[:at], self.buffer[at:]
            self.in_calls = True
            _, calls = self._blocks()
            return content, calls
        return "", self._blocks()[1]

    def _blocks(self, final: bool = False) -> tuple[str, list[DeltaToolCall]]:
        out = []
        while True:
            start = self.buffer.find(HERMES_START)
            if start < 0:
                keep = 0 if final else _partial_suffix(self.buffer, HERMES_START)
                self.buffer = self.buffer[len(self.buffer) - keep:]
                return "", out
            end = self.buffer.find(HERMES_END, start)
            if end < 0 and not final:
                self.buffer = self.buffer[start:]
                return "", out
            body = self.buffer[start + len(HERMES_START): end if end >= 0 else len(self.buffer)]
            self.buffer = self.buffer[end + len(HERMES_END):] if end >= 0 else ""
            try:
                call = _decoded_call(json.loads(body), "arguments")
            except json.JSONDecodeError:
                call = None
            if call is not None:
                out.append(_delta(self.num_calls, call))
                self.num_calls += 1

    def finish(self) -> tuple[str, list[DeltaToolCall]]:
        if not self.in_calls:
            content, self.buffer = self.buffer, ""
            return content, []
        return self._blocks(final=True)


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


def stream_parser(mode: str, name: str | None) -> StreamParser:
    if mode == "named":
        return NamedStreamParser(name or "")
    if mode == "required":
        return RequiredStreamParser()
    if mode == "auto":
        return HermesStreamParser()
    return StreamParser()
