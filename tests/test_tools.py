"""Tool calling in the HTTP layer (fast, no engine): tool definitions and tool_choice checks, the output parsers
(whole and streamed in every chunking), and the server over a scripted engine client whose model "writes" a given
text, through the official openai client: required / named / auto (hermes) calls, streaming assembled equal to
the non-streaming answer, the schema handed to the engine, tools and tool messages reaching the chat template."""
from __future__ import annotations

import asyncio
import json
import random
import re
import types

import httpx
import openai
import pytest

from vllm_lite.engine.output_processor import OutputProcessor
from vllm_lite.entrypoints.openai.api_server import build_app
from vllm_lite.entrypoints.openai.tool_parsers import parse_tool_calls, stream_parser
from vllm_lite.entrypoints.openai.tools import plan_tools
from vllm_lite.protocol import EngineCoreOutput, SchedulerStats

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}
TOOLS = [WEATHER, TIME]
TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:{% for t in tools %} {{ t.function.name }}{% endfor %}<|im_end|>\n"
    "{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.tool_calls %}{% for c in m.tool_calls %}"
    "<tool_call>{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}</tool_call>"
    "{% endfor %}{% elif m.role == 'tool' %}[{{ m.tool_call_id }}] {{ m.content }}{% else %}{{ m.content }}"
    "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
HERMES_TEXT = ('Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}'
               '</tool_call>\n<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call>')
REQUIRED_TEXT = ('[{"name": "get_weather", "parameters": {"city": "Oslo"}}, '
                 '{"name": "get_time", "parameters": {"zone": "UTC"}}]')
NAMED_TEXT = '{"city": "Lima", "unit": "f"}'


# ---- tool definitions and tool_choice ------------------------------------------------------------------------------

BAD_TOOLS = [
    ("not a list", "tools is invalid"),
    (["x"], r"tools\[0\] is invalid"),
    ([{"type": "code_interpreter"}], r"tools\[0\].type is invalid"),
    ([{"type": "function"}], r"tools\[0\].function is invalid"),
    ([{"type": "function", "function": {}}], r"tools\[0\].function.name is invalid"),
    ([{"type": "function", "function": {"name": "has space"}}], "function.name is invalid"),
    ([{"type": "function", "function": {"name": "x" * 65}}], "function.name is invalid"),
    ([{"type": "function", "function": {"name": 3}}], "function.name is invalid"),
    ([{"type": "function", "function": {"name": "f", "parameters": "{}"}}], "function.parameters is invalid"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], "parameters is invalid"),
    ([{"type": "function", "function": {"name": "f", "description": 5}}], "function.description is invalid"),
    ([{"type": "function", "function": {"name": "f", "strict": "yes"}}], "function.strict is invalid"),
    ([WEATHER, WEATHER], r"tools\[1\].function.name is invalid: 'get_weather' is defined twice"),
    ([WEATHER] * 129, "at most 128 tools"),
]


@pytest.mark.parametrize("tools,message", BAD_TOOLS)
def test_malformed_tool_definitions_are_refused(tools, message):
    with pytest.raises(ValueError, match=message):
        plan_tools(tools, "required", True, None)


def test_tool_choice_resolution():
    assert plan_tools(None, None, False, None).mode == "none"
    assert plan_tools(TOOLS, "none", False, None).mode == "none"
    assert plan_tools(TOOLS, None, True, None).mode == "auto"  # vLLM: tools without tool_choice mean "auto"
    with pytest.raises(ValueError, match='"auto" tool choice requires --enable-auto-tool-choice'):
        plan_tools(TOOLS, None, False, None)
    with pytest.raises(ValueError, match="tools must be set"):
        plan_tools(None, "required", True, None)
    with pytest.raises(ValueError, match="'sometimes' must be"):
        plan_tools(TOOLS, "sometimes", True, None)
    with pytest.raises(ValueError, match="'nope' is not among the tools"):
        plan_tools(TOOLS, {"type": "function", "function": {"name": "nope"}}, True, None)
    with pytest.raises(ValueError, match="named tool choice"):
        plan_tools(TOOLS, {"type": "function"}, True, None)
    named = plan_tools(TOOLS, {"type": "function", "function": {"name": "get_time"}}, False, None)
    assert (named.mode, named.name, named.schema) == ("named", "get_time", TIME["function"]["parameters"])
    req = plan_tools(TOOLS, "required", False, False)
    assert req.schema["type"] == "array" and req.schema["minItems"] == 1 and req.schema["maxItems"] == 1
    assert [c["properties"]["name"]["enum"] for c in req.schema["items"]["anyOf"]] == [["get_weather"], ["get_time"]]
    assert "maxItems" not in plan_tools(TOOLS, "required", False, None).schema


# ---- output parsers ------------------------------------------------------------------------------------------------

def _calls(calls):
    return [(c.function.name, json.loads(c.function.arguments)) for c in calls]


def test_whole_text_parsers():
    content, calls = parse_tool_calls("auto", HERMES_TEXT, None)
    assert content == "Let me check. "
    assert _calls(calls) == [("get_weather", {"city": "Paris", "unit": "c"}), ("get_time", {"zone": "CET"})]
    assert all(c.id.startswith("call_") and c.type == "function" for c in calls)
    assert parse_tool_calls("auto", "just text", None) == ("just text", [])
    bad = 'x <tool_call>{"name": "f", "arguments": {</tool_call>'
    assert parse_tool_calls("auto", bad, None) == (bad, [])  # not a call: the text stays content (vLLM)
    assert _calls(parse_tool_calls("required", REQUIRED_TEXT, None)[1]) == [("get_weather", {"city": "Oslo"}),
                                                                            ("get_time", {"zone": "UTC"})]
    assert parse_tool_calls("required", REQUIRED_TEXT[:30], None) == (REQUIRED_TEXT[:30], [])  # cut off
    cut = REQUIRED_TEXT[:REQUIRED_TEXT.index("get_time") + 5]  # max_tokens ended it in the second call
    assert _calls(parse_tool_calls("required", cut, None)[1]) == [("get_weather", {"city": "Oslo"})]
    content, calls = parse_tool_calls("named", NAMED_TEXT, "get_weather")
    assert content is None and calls[0].function.arguments == NAMED_TEXT
    assert parse_tool_calls("none", HERMES_TEXT, None) == (HERMES_TEXT, [])


@pytest.mark.parametrize("mode,text,name", [("auto", HERMES_TEXT, None), ("auto", "no calls here <tool", None),
                                            ("required", REQUIRED_TEXT, None), ("required", REQUIRED_TEXT[:-20], None),
                                            ("named", NAMED_TEXT, "get_weather"),
                                            ("none", HERMES_TEXT, None)])
def test_streamed_pieces_assemble_to_the_whole_text_result(mode, text, name):
    want_content, want_calls = parse_tool_calls(mode, text, name)
    rng = random.Random(0)
    for _ in range(40):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randrange(0, min(12, len(text) - 1))))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        parser = stream_parser(mode, name)
        outs = [parser.feed(p) for p in pieces] + [parser.finish()]
        content = "".join(c for c, _ in outs)
        assert (content or None) == (want_content or None)
        assert _calls(_assemble([d for _, ds in outs for d in ds])) == _calls(want_calls)


class _Call:
    def __init__(self, name: str, arguments: str) -> None:
        self.function = types.SimpleNamespace(name=name, arguments=arguments)


def _assemble(deltas) -> list:
    """Tool-call deltas (protocol models or openai client objects) -> complete calls, as OpenAI clients do."""
    calls: dict[int, list] = {}
    for d in deltas:
        entry = calls.setdefault(d.index, [None, None, ""])
        if d.id:
            entry[0] = d.id
        if d.function is not None:
            entry[1] = d.function.name or entry[1]
            entry[2] += d.function.arguments or ""
    assert all(e[0].startswith("call_") for e in calls.values())
    return [_Call(calls[i][1], calls[i][2]) for i in sorted(calls)]


# ---- the server over a scripted engine -----------------------------------------------------------------------------

class ScriptedClient:
    """AsyncEngineClient's API; every sequence "generates" the tokens of `self.script`, then finishes with stop."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.info = types.SimpleNamespace(model="tiny", path="/fake", max_model_len=512,
                                          vocab_size=len(tokenizer), hf_config=None)
        self.processor = OutputProcessor(tokenizer)
        self.stats = SchedulerStats()
        self.dead_reason = None
        self.output_listeners: list = []
        self.script = ""
        self.params: list = []
        self.prompts: list[list[int]] = []
        self.is_healthy = True
        self.num_in_flight = 0

    async def generate(self, request_id, prompt, prompt_token_ids, params):
        self.params.append(params)
        self.prompts.append(list(prompt_token_ids))
        self.processor.add_request(request_id, prompt, prompt_token_ids, params)
        state = self.processor.requests[request_id]
        ids = self.tokenizer(self.script, add_special_tokens=False).input_ids
        for step, tok in enumerate(ids):
            await asyncio.sleep(0)
            fin = "stop" if step == len(ids) - 1 else None
            self.processor.process_outputs([EngineCoreOutput(s.engine_id, [tok], None, fin)
                                            for s in state.sequences])
            yield state
        self.processor.requests.pop(request_id, None)

    async def abort(self, request_id):
        self.processor.abort_request(request_id)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tiny_models import make_tiny_tokenizer
    return make_tiny_tokenizer(str(tmp_path_factory.mktemp("tok")))


def _client(engine, tool_parser=None):
    app = build_app(engine, ["tiny"], chat_template=TEMPLATE, tool_parser=tool_parser)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
    return openai.AsyncOpenAI(base_url="http://test/v1", api_key="EMPTY", http_client=http, max_retries=0)


async def _both(client, **kwargs):
    """The non-streaming answer and the streamed one: (content, calls, finish_reason) each, for n choices."""
    full = await client.chat.completions.create(model="tiny", **kwargs)
    stream = await client.chat.completions.create(model="tiny", stream=True, **kwargs)
    content: dict[int, str] = {}
    deltas: dict[int, list] = {}
    finish: dict[int, str] = {}
    async for chunk in stream:
        for ch in chunk.choices:
            content[ch.index] = content.get(ch.index, "") + (ch.delta.content or "")
            deltas.setdefault(ch.index, []).extend(ch.delta.tool_calls or [])
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    streamed = [(content[i] or None, _calls(_assemble(deltas[i])), finish[i]) for i in sorted(content)]
    whole = [(c.message.content or None, _calls(c.message.tool_calls or []), c.finish_reason) for c in full.choices]
    return whole, streamed


MESSAGES = [{"role": "user", "content": "Weather in Oslo?"}]
BAD_PARAMETERS = {"type": "object", "properties": {"a": {"type": "nope"}}}


def test_required_named_and_auto_through_the_openai_client(tokenizer):
    engine = ScriptedClient(tokenizer)

    async def go():
        client = _client(engine, tool_parser="hermes")
        engine.script = REQUIRED_TEXT
        whole, streamed = await _both(client, messages=MESSAGES, tools=TOOLS, tool_choice="required", n=2,
                                      max_tokens=200)
        want = (None, [("get_weather", {"city": "Oslo"}), ("get_time", {"zone": "UTC"})], "tool_calls")
        assert whole == streamed == [want, want]
        schema = engine.params[-1].structured_outputs.json
        assert schema == plan_tools(TOOLS, "required", True, None).schema

        engine.script = NAMED_TEXT
        whole, streamed = await _both(client, messages=MESSAGES, tools=TOOLS, max_tokens=200,
                                      tool_choice={"type": "function", "function": {"name": "get_weather"}})
        assert whole == streamed == [(None, [("get_weather", {"city": "Lima", "unit": "f"})], "tool_calls")]
        assert engine.params[-1].structured_outputs.json == WEATHER["function"]["parameters"]

        engine.script = HERMES_TEXT
        whole, streamed = await _both(client, messages=MESSAGES, tools=TOOLS, max_tokens=200)  # "auto"
        assert whole == streamed == [("Let me check. ", [("get_weather", {"city": "Paris", "unit": "c"}),
                                                          ("get_time", {"zone": "CET"})], "tool_calls")]
        assert engine.params[-1].structured_outputs is None

        engine.script = "It is sunny."
        whole, streamed = await _both(client, messages=MESSAGES, tools=TOOLS, tool_choice="auto", max_tokens=200)
        assert whole == streamed == [("It is sunny.", [], "stop")]
        whole, streamed = await _both(client, messages=MESSAGES, tools=TOOLS, tool_choice="none", max_tokens=200)
        assert whole == streamed == [("It is sunny.", [], "stop")]
    asyncio.run(go())


def test_tools_and_tool_messages_reach_the_template(tokenizer):
    engine = ScriptedClient(tokenizer)
    engine.script = "ok"
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}]

    async def go():
        client = _client(engine)
        await client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice="none")
        return tokenizer.decode(engine.prompts[-1])
    prompt = asyncio.run(go())
    assert "Tools: get_weather get_time" in prompt
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>' in prompt
    assert "[call_1] 21 C" in prompt


@pytest.mark.parametrize("body,message", [
    (dict(tools=TOOLS, tool_choice="auto"), '"auto" tool choice requires --enable-auto-tool-choice'),
    (dict(tools=TOOLS), '"auto" tool choice requires'),
    (dict(tools=[{"type": "function", "function": {"name": "a b"}}], tool_choice="required"), "function.name"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": BAD_PARAMETERS}}],
          tool_choice="required"), "tools is invalid"),
    (dict(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}), "cannot be combined"),
    (dict(tool_choice="required"), "tools must be set"),
    (dict(messages=[{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}], tools=TOOLS,
          tool_choice="none"), r"messages\[0\].tool_calls\[0\] is invalid"),
    (dict(messages=[{"role": "assistant", "tool_calls": "x"}]), r"messages.0.tool_calls: Input should be a valid list"),
])
def test_bad_tool_requests_are_400_with_a_message(tokenizer, body, message):
    engine = ScriptedClient(tokenizer)

    async def go():
        app = build_app(engine, ["tiny"], chat_template=TEMPLATE)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            return await http.post("/v1/chat/completions", json={"messages": MESSAGES, **body})
    r = asyncio.run(go())
    assert r.status_code == 400, r.text
    assert re.search(message, r.json()["error"]["message"])
    assert not engine.params  # refused before admission
