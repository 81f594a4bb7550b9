"""Structured outputs, tool calling and logit_bias through a real `vllm-lite serve` of the default model
(SmolLM2-135M-Instruct, CPU) with the official openai client: json_schema outputs validate with jsonschema,
json_object parses, regex / choice / EBNF via structured_outputs and the guided_* aliases match, on chat and
completions, streaming and not, n=2; tool calls (required, named, auto with the hermes parser) streamed equal to
non-streamed; logit_bias / allowed_token_ids / bad_words; two dozen bad requests answered 400 with a message while
a long greedy stream and structured requests run beside it, the stream unchanged from its solo run."""
from __future__ import annotations

import asyncio
import json
import re

import httpx
import jsonschema
import openai
import pytest

from server_utils import RemoteServer

MODEL = "smollm2-135m-instruct"
# ChatML with tools in the system turn and hermes-style <tool_call> blocks (SmolLM2's own template has no tools)
TEMPLATE = """{%- if tools %}<|im_start|>system
You can call these functions:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
Call one as <tool_call>{"name": <function name>, "arguments": <arguments object>}</tool_call><|im_end|>
{% endif %}{%- for m in messages %}<|im_start|>{{ m.role }}
{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ {"name": c.function.name, "arguments":
c.function.arguments} | tojson }}</tool_call>{% endfor %}{% else %}{{ m.content }}{% endif %}<|im_end|>
{% endfor %}{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
COLOR = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                          "count": {"type": "integer", "minimum": 1, "maximum": 9}},
         "required": ["color", "count"], "additionalProperties": False}
NUMBERS = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 2, "maxItems": 3}
POINT = {"$defs": {"pt": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                                           "y": {"type": "integer", "minimum": -9, "maximum": 9}},
                          "required": ["x", "y"], "additionalProperties": False}},
         "type": "object", "properties": {"a": {"$ref": "#/$defs/pt"}, "ok": {"type": "boolean"}},
         "required": ["a", "ok"], "additionalProperties": False}
SCHEMAS = [PERSON, COLOR, NUMBERS, POINT]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Local time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 12}},
                   "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
LONG = dict(model=MODEL, prompt="Write a long story about a dragon and a knight.", max_tokens=32, temperature=0,
            ignore_eos=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    template = tmp_path_factory.mktemp("template") / "tools.jinja"
    template.write_text(TEMPLATE)
    args = ["--device", "cpu", "--max-model-len", "1024", "--seed", "0", "--chat-template", str(template),
            "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    with RemoteServer(None, args) as srv:
        yield srv


@pytest.fixture(scope="module")
def solo_long(server) -> str:
    """The long greedy stream run alone (the reference for the run beside bad and structured requests)."""
    return httpx.post(server.url_for("v1", "completions"), json=LONG, timeout=300).json()["choices"][0]["text"]


def aclient(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url_for("v1"), api_key="EMPTY", max_retries=0, timeout=300)


async def chat_text(client, stream: bool, **kw) -> list[tuple[str, str]]:
    """(text, finish_reason) per choice, streamed or not."""
    if not stream:
        r = await client.chat.completions.create(model=MODEL, **kw)
        return [(c.message.content, c.finish_reason) for c in r.choices]
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    async for chunk in await client.chat.completions.create(model=MODEL, stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            finish[c.index] = c.finish_reason or finish.get(c.index)
    return [(texts[i], finish[i]) for i in sorted(texts)]


async def cmpl_text(client, stream: bool, **kw) -> list[tuple[str, str]]:
    if "response_format" in kw:  # not an argument of the client's completions.create: sent as an extra field
        kw["extra_body"] = {**kw.get("extra_body", {}), "response_format": kw.pop("response_format")}
    if not stream:
        r = await client.completions.create(model=MODEL, **kw)
        return [(c.text, c.finish_reason) for c in sorted(r.choices, key=lambda c: c.index)]
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    async for chunk in await client.completions.create(model=MODEL, stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            finish[c.index] = c.finish_reason or finish.get(c.index)
    return [(texts[i], finish[i]) for i in sorted(texts)]


def test_json_schema_and_json_object_on_chat_and_completions(server):
    """Every schema through chat and completions, streaming and not, n=2 sampled: what finishes with stop validates
    (a small model may wander into whitespace until max_tokens, so that is allowed, but rarely: the array schema,
    which it fills with newlines, goes through structured_outputs with disable_any_whitespace)."""
    async def go():
        client = aclient(server)
        jobs, schemas = [], []
        for i, schema in enumerate(SCHEMAS):  # each schema on one of the 4 (endpoint, streaming) pairs
            common = dict(n=2, temperature=0.3, seed=i, max_tokens=48)
            if schema is NUMBERS:
                common["extra_body"] = {"structured_outputs": {"json": schema, "disable_any_whitespace": True}}
            else:
                common["response_format"] = {"type": "json_schema",
                                             "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}}
            stream = i % 2 == 1
            if i < 2:
                jobs.append(chat_text(client, stream, messages=[{"role": "user", "content": "Reply in JSON."}],
                                      **common))
            else:
                jobs.append(cmpl_text(client, stream, prompt="JSON:", **common))
            schemas.append(schema)
        jobs.append(chat_text(client, False, messages=[{"role": "user", "content": "Give a JSON object."}],
                              response_format={"type": "json_object"}, temperature=0, max_tokens=32))
        return schemas, await asyncio.gather(*jobs)
    schemas, results = asyncio.run(go())
    finished = 0
    for schema, outs in zip(schemas, results):
        assert len(outs) == 2
        for text, finish in outs:
            assert finish in ("stop", "length"), finish
            if finish == "stop":
                finished += 1
                jsonschema.validate(json.loads(text), schema)
    assert finished >= 0.75 * 2 * len(schemas), f"only {finished} of {2 * len(schemas)} outputs finished"
    (obj_text, obj_finish), = results[-1]
    if obj_finish == "stop":
        assert isinstance(json.loads(obj_text), dict)
    else:  # cut by max_tokens: still the start of an object
        assert obj_text.lstrip().startswith("{")


def test_regex_choice_grammar_via_structured_outputs_and_guided_aliases(server):
    grammar = 'root ::= "(" num ("+" num)* ")"\nnum ::= [1-9] [0-9]?'
    cases = [({"structured_outputs": {"regex": r"\d{3}-\d{4}"}}, r"\d{3}-\d{4}"),
             ({"guided_regex": r"[a-z]{2,6}@[a-z]{2,6}\.com"}, r"[a-z]{2,6}@[a-z]{2,6}\.com"),
             ({"structured_outputs": {"choice": ["red", "green", "blue"]}}, "red|green|blue"),
             ({"guided_choice": ["yes", "no"]}, "yes|no"),
             ({"structured_outputs": {"grammar": grammar}}, r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)"),
             ({"guided_grammar": grammar}, r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)"),
             ({"guided_json": json.dumps(COLOR), "guided_whitespace_pattern": ""}, None)]  # "": no whitespace

    async def go():
        client = aclient(server)
        jobs = []
        for body, _ in cases:
            common = dict(n=2, temperature=0.5, seed=3, max_tokens=32, extra_body=body)
            jobs += [cmpl_text(client, False, prompt="Answer:", **common),
                     chat_text(client, True, messages=[{"role": "user", "content": "Answer."}], **common)]
        return await asyncio.gather(*jobs)
    results = asyncio.run(go())
    for i, outs in enumerate(results):
        pattern = cases[i // 2][1]
        for text, finish in outs:
            assert finish == "stop", (cases[i // 2], text)
            if pattern is None:
                assert "\n" not in text  # xgrammar's compact separators (", ", ": ") only
                jsonschema.validate(json.loads(text), COLOR)
            else:
                assert re.fullmatch(pattern, text), (pattern, text)


async def _tool_answers(client, max_tokens: int = 48, **kw):
    """(whole, streamed): [(content, [(name, arguments dict)], finish_reason)] of the same greedy request."""
    kw.update(model=MODEL, temperature=0, max_tokens=max_tokens)
    full, stream = await asyncio.gather(client.chat.completions.create(**kw),
                                        client.chat.completions.create(stream=True, **kw))
    content, calls, finish = "", {}, None
    async for chunk in stream:
        for c in chunk.choices:
            content += c.delta.content or ""
            for d in c.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
                entry["id"] = d.id or entry["id"]
                if d.function is not None:
                    entry["name"] = d.function.name or entry["name"]
                    entry["arguments"] += d.function.arguments or ""
            finish = c.finish_reason or finish
    assert all(e["id"].startswith("call_") for e in calls.values())
    m = full.choices[0].message
    assert all(c.id.startswith("call_") and c.type == "function" for c in m.tool_calls or [])
    whole = (m.content or None, [(c.function.name, json.loads(c.function.arguments)) for c in m.tool_calls or []],
             full.choices[0].finish_reason)
    streamed = (content or None, [(calls[i]["name"], json.loads(calls[i]["arguments"])) for i in sorted(calls)],
                finish)
    return whole, streamed


def test_tool_calls_required_named_and_auto(server):
    hermes = (r'<tool_call>\{"name": "get_weather", "arguments": \{"city": "[A-Z][a-z]{2,9}", "unit": "celsius"\}\}'
              r'</tool_call>')

    async def go():
        client = aclient(server)
        return await asyncio.gather(
            _tool_answers(client, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False),
            _tool_answers(client, messages=ASK, tools=TOOLS,
                          tool_choice={"type": "function", "function": {"name": "get_time"}}),
            _tool_answers(client, messages=ASK, tools=TOOLS, tool_choice="auto", extra_body={"guided_regex": hermes}),
            _tool_answers(client, 12, messages=ASK, tools=TOOLS, tool_choice="none"))
    required, named, auto, none = asyncio.run(go())
    for whole, streamed in (required, named, auto):
        assert whole == streamed
        content, calls, finish = whole
        assert calls and finish == "tool_calls"
        for name, args in calls:
            spec = next(t for t in TOOLS if t["function"]["name"] == name)
            jsonschema.validate(args, spec["function"]["parameters"])
    assert required[0][0] is None and named[0][0] is None
    assert [n for n, _ in named[0][1]] == ["get_time"]
    assert [n for n, _ in auto[0][1]] == ["get_weather"] and auto[0][0] is None
    assert none[0] == none[1] and none[0][1] == [] and none[0][0]


def test_logit_bias_allowed_token_ids_and_bad_words(server):
    tok = httpx.post(server.url_for("tokenize"), json={"prompt": " banana"}).json()["tokens"]
    base = dict(model=MODEL, prompt="My favourite fruit is", max_tokens=6, temperature=0, ignore_eos=True)
    allowed = [tok[-1], 28, 29]

    async def ids(http, **kw) -> tuple[list[int], str]:
        r = (await http.post(server.url_for("v1", "completions"), json={**base, **kw})).json()
        text = r["choices"][0]["text"]
        tokens = await http.post(server.url_for("tokenize"), json={"prompt": text, "add_special_tokens": False})
        return tokens.json()["tokens"], text

    async def go():
        async with httpx.AsyncClient(timeout=300) as http:
            runs = await asyncio.gather(ids(http, logit_bias={str(tok[-1]): 100}),
                                        ids(http, allowed_token_ids=allowed), ids(http))
            word = runs[2][1].split()[0]
            return runs, word, await ids(http, bad_words=[word])
    ((biased, _), (got, _), (_, plain)), word, (_, banned) = asyncio.run(go())
    assert biased == [tok[-1]] * 6
    assert got and set(got) <= set(allowed)
    assert word not in banned.split() and banned != plain


BAD = [
    ("chat", {"response_format": {"type": "xml"}}, "response_format.type"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "json_schema.schema"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "str"}}}, "schema"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"schema": PERSON}}}, "json_schema.name"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nope"}}}}}}, "structured_outputs"),
    ("cmpl", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"not": {"type": "string"}}}}}, "not"),
    ("cmpl", {"structured_outputs": {"regex": "(ab"}}, "regex"),
    ("cmpl", {"structured_outputs": {"grammar": "root ::= "}}, "grammar"),
    ("cmpl", {"structured_outputs": {"grammar": "root ::= missing_rule"}}, "grammar"),
    ("cmpl", {"structured_outputs": {"choice": []}}, "choice"),
    ("cmpl", {"structured_outputs": {"regex": "a", "choice": ["a"]}}, "exactly one"),
    ("cmpl", {"structured_outputs": {"schema": {}}}, "not a known field"),
    ("cmpl", {"guided_regex": "[a-"}, "regex"),
    ("chat", {"guided_json": "{not json"}, "json"),
    ("chat", {"guided_json": {"type": "object"}, "response_format": {"type": "json_object"}}, "only one kind"),
    ("chat", {"guided_whitespace_pattern": r"\s+", "guided_json": {"type": "object"}}, "whitespace_pattern"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "bad name"}}], "tool_choice": "required"},
     "function.name"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}, "parameters"),
    ("chat", {"tools": [{"type": "retrieval"}], "tool_choice": "required"}, "type"),
    ("chat", {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
    ("chat", {"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": "x"}}}}}], "tool_choice": "required"},
     "tools is invalid"),
    ("cmpl", {"logit_bias": {"abc": 1}}, "logit_bias"),
    ("cmpl", {"logit_bias": {"5": 150}}, "logit_bias"),
    ("chat", {"logit_bias": {"99999999": 1}}, "out of the vocabulary"),
    ("cmpl", {"allowed_token_ids": []}, "allowed_token_ids"),
    ("chat", {"bad_words": [""]}, "bad_words"),
]


def test_bad_requests_are_400_while_a_long_stream_and_structured_requests_run(server, solo_long):
    urls = {"chat": server.url_for("v1", "chat", "completions"), "cmpl": server.url_for("v1", "completions")}
    bodies = {"chat": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
              "cmpl": {"model": MODEL, "prompt": "hi", "max_tokens": 4}}

    async def go():
        async with httpx.AsyncClient(timeout=300) as http:
            async def long_stream() -> str:
                text = ""
                async with http.stream("POST", urls["cmpl"], json={**LONG, "stream": True}) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            text += json.loads(line[6:])["choices"][0]["text"]
                return text

            async def bad(kind, extra):
                await asyncio.sleep(0.5)
                return await http.post(urls[kind], json={**bodies[kind], **extra})
            structured = [cmpl_text(aclient(server), False, prompt="JSON:", max_tokens=48, temperature=0,
                                    response_format={"type": "json_schema",
                                                     "json_schema": {"name": "p", "schema": PERSON}})]
            return await asyncio.gather(long_stream(), *structured, *(bad(k, e) for k, e, _ in BAD))
    long_text, person, *responses = asyncio.run(go())
    assert len(BAD) >= 20
    for (kind, extra, needle), r in zip(BAD, responses):
        assert r.status_code == 400, (extra, r.text)
        message = r.json()["error"]["message"]
        assert needle in message, (extra, message)
    assert long_text == solo_long
    (text, finish), = person
    assert finish == "stop"
    jsonschema.validate(json.loads(text), PERSON)
