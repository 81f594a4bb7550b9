"""Fast tests of the HTTP layer without an engine: request -> SamplingParams, validation errors, response shapes,
SSE streaming, auth and metrics, over a fake engine client that replays the prompt's tokens (real tokenizer,
real OutputProcessor, so detokenization and stop strings behave as in the server)."""
from __future__ import annotations

import asyncio
import json
import types

import httpx
import openai
import pytest

from vllm_lite.protocol import EngineCoreOutput, SchedulerStats
from vllm_lite.engine.output_processor import OutputProcessor
from vllm_lite.entrypoints.openai.api_server import build_app
from vllm_lite.entrypoints.openai.errors import EngineDeadError, param_of, validation_message
from vllm_lite.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest

MODEL = "tiny"


class FakeClient:
    """AsyncEngineClient's API; sequence i of a request emits the prompt's tokens from offset i, one per step."""

    def __init__(self, tokenizer, max_model_len: int = 128, delay: float = 0.0) -> None:
        self.tokenizer = tokenizer
        self.info = types.SimpleNamespace(model=MODEL, path="/fake", max_model_len=max_model_len,
                                          vocab_size=len(tokenizer), hf_config=None)
        self.processor = OutputProcessor(tokenizer)
        self.stats = SchedulerStats(num_running_reqs=1, num_waiting_reqs=2, kv_cache_usage=0.25,
                                    prefix_cache_queries=10, prefix_cache_hits=4)
        self.dead_reason = None
        self.output_listeners: list = []
        self.delay = delay
        self.aborted: list[str] = []
        self.params: list = []
        self.die_after: int | None = None

    @property
    def is_healthy(self) -> bool:
        return self.dead_reason is None

    async def generate(self, request_id, prompt, prompt_token_ids, params):
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        self.params.append(params)
        self.processor.add_request(request_id, prompt, prompt_token_ids, params)
        state = self.processor.requests[request_id]
        finished, step = False, 0
        try:
            while True:
                await asyncio.sleep(self.delay)
                if self.die_after is not None and step >= self.die_after:
                    self.dead_reason = "killed"
                    raise EngineDeadError(self.dead_reason)
                outs = []
                for seq in state.sequences:
                    if seq.finish_reason is not None:
                        continue
                    tok = prompt_token_ids[(step + seq.index) % len(prompt_token_ids)]
                    lps = None
                    if params.logprobs is not None:
                        lps = [[(tok, -0.5, 1)] + [((tok + k) % len(self.tokenizer), -0.5 - k, k + 1)
                                                   for k in range(params.logprobs)]]
                    fin = "length" if step + 1 >= params.max_tokens else None
                    outs.append(EngineCoreOutput(seq.engine_id, [tok], lps, fin))
                from vllm_lite.protocol import EngineCoreOutputs
                for listener in self.output_listeners:
                    listener(EngineCoreOutputs(outs))
                _, to_abort = self.processor.process_outputs(outs)
                step += 1
                finished = state.finished
                yield state
                if finished:
                    return
        finally:
            if not finished:
                self.aborted.extend(self.processor.abort_request(request_id))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tiny_models import make_tiny_tokenizer
    return make_tiny_tokenizer(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture
def fake(tokenizer):
    return FakeClient(tokenizer)


def _http(app):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def _openai(app, api_key="EMPTY"):
    return openai.AsyncOpenAI(base_url="http://test/v1", api_key=api_key, http_client=_http(app), max_retries=0)


def run(coro):
    return asyncio.run(coro)


# ---- request -> SamplingParams -------------------------------------------------------------------------------------

def test_prompt_logprobs_body_field_is_refused_not_ignored():
    """vLLM's per-choice prompt_logprobs response is not built: the field is a clear error (400), not a no-op."""
    with pytest.raises(ValueError, match="prompt_logprobs is not supported.*echo=true"):
        CompletionRequest(prompt="hi", prompt_logprobs=1).check()
    with pytest.raises(ValueError, match="prompt_logprobs"):
        ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], prompt_logprobs=0).check()
    CompletionRequest(prompt="hi", echo=True, logprobs=1).check()


def test_completion_request_to_sampling_params():
    req = CompletionRequest(prompt="hi", max_tokens=5, temperature=0, top_k=-1, stop="x", seed=3, n=2,
                            logprobs=2, stop_token_ids=[7], ignore_eos=True, min_tokens=1, repetition_penalty=1.1)
    p = req.to_sampling_params(100)
    assert (p.max_tokens, p.temperature, p.top_k, p.stop, p.seed, p.n, p.logprobs) == (5, 0, 0, ["x"], 3, 2, 2)
    assert p.stop_token_ids == [7] and p.ignore_eos and p.min_tokens == 1 and p.repetition_penalty == 1.1
    assert CompletionRequest(prompt="hi").to_sampling_params(100).max_tokens == 16  # OpenAI/vLLM default
    assert CompletionRequest(prompt="hi", max_tokens=None).to_sampling_params(77).max_tokens == 77


def test_chat_request_to_sampling_params():
    msgs = [{"role": "user", "content": "hi"}]
    assert ChatCompletionRequest(messages=msgs).to_sampling_params(90).max_tokens == 90  # rest of the context
    p = ChatCompletionRequest(messages=msgs, max_completion_tokens=4, max_tokens=9, logprobs=True,
                              top_logprobs=3).to_sampling_params(90)
    assert p.max_tokens == 4 and p.logprobs == 3
    assert ChatCompletionRequest(messages=msgs, logprobs=True).to_sampling_params(9).logprobs == 0
    assert ChatCompletionRequest(messages=msgs).to_sampling_params(9).logprobs is None
    parts = ChatCompletionRequest(messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                         {"type": "text", "text": "b"}]}])
    assert parts.conversation() == [{"role": "user", "content": "a\nb"}]


@pytest.mark.parametrize("field,value", [("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.5), ("min_p", 2.0),
                                         ("n", 0), ("presence_penalty", 3.0), ("frequency_penalty", -3.0),
                                         ("repetition_penalty", 0.0), ("top_k", -5)])
def test_invalid_values_name_the_field(field, value):
    req = CompletionRequest(prompt="hi", **{field: value})
    with pytest.raises(ValueError) as info:
        req.check()
        req.to_sampling_params(100)
    assert field in str(info.value) and param_of(str(info.value)) == field


def test_request_checks():
    with pytest.raises(ValueError, match="max_tokens"):
        CompletionRequest(prompt="x", max_tokens=0).check()
    with pytest.raises(ValueError, match="logprobs"):
        CompletionRequest(prompt="x", logprobs=50).check()
    with pytest.raises(ValueError, match="top_logprobs"):
        ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], top_logprobs=2).check()
    with pytest.raises(ValueError, match="stream_options"):
        CompletionRequest(prompt="x", stream_options={"include_usage": True}).check()
    assert CompletionRequest(prompt=[1, 2]).prompts() == [[1, 2]]
    assert CompletionRequest(prompt=[[1], [2, 3]]).prompts() == [[1], [2, 3]]
    assert CompletionRequest(prompt=["a", "b"]).prompts() == ["a", "b"]


def test_validation_message():
    msg, param = validation_message([{"loc": ("body", "temperature"), "msg": "Input should be a valid number",
                                      "type": "float_parsing"}])
    assert param == "temperature" and "temperature" in msg


# ---- the app over a fake engine -----------------------------------------------------------------------------------

def test_completions_shapes(fake, tokenizer):
    app = build_app(fake, MODEL)

    async def go():
        client = _openai(app)
        prompt = "Hello world! Hello world!"
        n_prompt = len(tokenizer(prompt).input_ids)
        r = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, n=2, logprobs=2)
        assert r.id.startswith("cmpl-") and len(r.choices) == 2
        assert [c.index for c in r.choices] == [0, 1]
        assert r.usage.prompt_tokens == n_prompt and r.usage.completion_tokens == 10
        assert r.usage.total_tokens == n_prompt + 10
        c0 = r.choices[0]
        assert c0.finish_reason == "length" and len(c0.logprobs.tokens) == 5
        assert c0.text == tokenizer.decode(tokenizer(prompt).input_ids[:5])
        assert c0.logprobs.text_offset[0] == 0 and len(c0.logprobs.top_logprobs[0]) >= 2
        assert "".join(c0.logprobs.tokens) == c0.text
        # echo, several prompts (index = prompt_idx * n + i), token-id prompts
        r = await client.completions.create(model=MODEL, prompt=["abc", "Paris"], max_tokens=2, echo=True, n=2)
        assert [c.index for c in r.choices] == [0, 1, 2, 3]
        assert r.choices[0].text.startswith("abc") and r.choices[2].text.startswith("Paris")
        r = await client.completions.create(model=MODEL, prompt=[[5, 6, 7], [8, 9]], max_tokens=3)
        assert len(r.choices) == 2 and r.usage.prompt_tokens == 5
        # stop string
        r = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, stop=["!"])
        assert r.choices[0].text == "Hello world" and r.choices[0].finish_reason == "stop"
        assert r.choices[0].model_extra["stop_reason"] == "!"
        r = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, stop="!",
                                            extra_body={"include_stop_str_in_output": True})
        assert r.choices[0].text == "Hello world!"
    run(go())


def test_completions_streaming(fake, tokenizer):
    app = build_app(fake, MODEL)

    async def go():
        client = _openai(app)
        prompt = "Hello world! Hello world!"
        full = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, n=2)
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, n=2, stream=True,
                                                 stream_options={"include_usage": True})
        texts, finish, usage = {0: "", 1: ""}, {}, None
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                texts[c.index] += c.text
                if c.finish_reason:
                    finish[c.index] = c.finish_reason
        assert texts == {c.index: c.text for c in full.choices}
        assert finish == {0: "length", 1: "length"} and usage.completion_tokens == 16
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, stop=["d!"],
                                                 stream=True)
        text = "".join([c.choices[0].text async for c in stream])
        assert text == "Hello worl"
    run(go())


def test_sse_framing_and_done(fake):
    app = build_app(fake, MODEL)

    async def go():
        async with _http(app) as http:
            r = await http.post("/v1/completions", json={"model": MODEL, "prompt": "abc", "max_tokens": 3,
                                                         "stream": True})
            assert r.headers["content-type"].startswith("text/event-stream")
            events = [e for e in r.text.split("\n\n") if e]
            assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    run(go())


def test_chat_shapes_and_streaming(fake, tokenizer):
    app = build_app(fake, MODEL, trust_request_chat_template=True)

    async def go():
        client = _openai(app)
        msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Hello world!"}]
        r = await client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, logprobs=True,
                                                 top_logprobs=2, n=2)
        assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and len(r.choices) == 2
        ids = [t for t in tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)]
        assert r.usage.prompt_tokens == len(tokenizer(tokenizer.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=True), add_special_tokens=False).input_ids) and ids
        lp = r.choices[0].logprobs.content
        assert len(lp) == 4 and len(lp[0].top_logprobs) == 2 and lp[0].bytes == list(lp[0].token.encode())
        assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "length"
        stream = await client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, stream=True,
                                                      stream_options={"include_usage": True}, logprobs=True)
        text, roles, usage, nlp = "", [], None, 0
        async for chunk in stream:
            if chunk.usage:
                usage = chunk.usage
            for c in chunk.choices:
                roles += [c.delta.role] if c.delta.role else []
                text += c.delta.content or ""
                nlp += len(c.logprobs.content) if c.logprobs else 0
        assert roles == ["assistant"] and text == r.choices[0].message.content
        assert usage.completion_tokens == 4 and nlp == 4
        # chat_template override
        r = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "abc"}], max_tokens=3,
            extra_body={"chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"})
        assert r.usage.prompt_tokens == len(tokenizer("abc", add_special_tokens=False).input_ids)
    run(go())


def test_errors(fake):
    app = build_app(fake, MODEL)

    async def go():
        async with _http(app) as http:
            r = await http.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 400, "max_tokens": 1})
            err = r.json()["error"]
            assert r.status_code == 400 and err["code"] == 400 and err["type"] == "BadRequestError"
            assert "128" in err["message"] and str(len(fake.tokenizer("x" * 400).input_ids)) in err["message"]
            r = await http.post("/v1/completions", json={"model": MODEL, "prompt": "abc", "max_tokens": 200})
            assert r.status_code == 400 and "128" in r.json()["error"]["message"]
            r = await http.post("/v1/completions", json={"model": MODEL, "prompt": "abc", "temperature": -1})
            assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
            assert "temperature" in r.json()["error"]["message"]
            r = await http.post("/v1/chat/completions", json={"model": MODEL, "messages": "nope"})
            assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
            r = await http.post("/v1/completions", json={"model": "other", "prompt": "abc"})
            assert r.status_code == 404 and r.json()["error"]["type"] == "NotFoundError"
            r = await http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
            assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
            r = await http.post("/v1/completions", json={"model": MODEL})
            assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
            r = await http.get("/nope")
            assert r.status_code == 404 and "error" in r.json()
            r = await http.post("/v1/completions", json={"model": MODEL, "prompt": [10 ** 6]})
            assert r.status_code == 400 and "vocabulary" in r.json()["error"]["message"]
    run(go())


def test_auth(fake):
    app = build_app(fake, MODEL, api_key="sekret")

    async def go():
        async with _http(app) as http:
            assert (await http.get("/health")).status_code == 200
            r = await http.get("/v1/models")
            assert r.status_code == 401 and r.json()["error"]["code"] == 401
            r = await http.get("/v1/models", headers={"Authorization": "Bearer wrong"})
            assert r.status_code == 401
            r = await http.get("/v1/models", headers={"Authorization": "Bearer sekret"})
            assert r.status_code == 200 and r.json()["data"][0]["id"] == MODEL
        with pytest.raises(openai.AuthenticationError):
            await _openai(app, "bad").models.list()
        assert (await _openai(app, "sekret").models.list()).data[0].id == MODEL
    run(go())


def test_misc_routes_and_metrics(fake, tokenizer):
    app = build_app(fake, MODEL)

    async def go():
        async with _http(app) as http:
            assert (await http.get("/version")).json()["version"]
            r = await http.post("/tokenize", json={"prompt": "Hello world"})
            ids = tokenizer("Hello world").input_ids
            assert r.json()["tokens"] == ids and r.json()["count"] == len(ids) and r.json()["max_model_len"] == 128
            r = await http.post("/detokenize", json={"tokens": ids})
            assert r.json()["prompt"] == "Hello world"
            r = await http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})
            assert r.json()["count"] > 1
            await http.post("/v1/completions", json={"model": MODEL, "prompt": "abcdef", "max_tokens": 3})
            text = (await http.get("/metrics")).text
            for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                         "vllm:gpu_cache_usage_perc", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
                         "vllm:time_to_first_token_seconds_bucket", "vllm:time_per_output_token_seconds_bucket",
                         "vllm:e2e_request_latency_seconds_count", "vllm:prefix_cache_queries_total",
                         "vllm:prefix_cache_hits_total", "vllm:prefix_cache_hit_rate"):
                assert name in text, name
            assert 'vllm:generation_tokens_total{model_name="tiny"} 3.0' in text
            assert 'vllm:num_requests_waiting{model_name="tiny"} 2.0' in text
            assert 'vllm:prefix_cache_hit_rate{model_name="tiny"} 0.4' in text
            fake.dead_reason = "gone"
            r = await http.get("/health")
            assert r.status_code == 503 and "gone" in r.json()["error"]["message"]
    run(go())


def test_engine_death_errors(tokenizer):
    fake = FakeClient(tokenizer, delay=0.001)
    fake.die_after = 2
    app = build_app(fake, MODEL)

    async def go():
        async with _http(app) as http:
            r = await http.post("/v1/completions", json={"model": MODEL, "prompt": "abc", "max_tokens": 10})
            assert r.status_code == 500 and r.json()["error"]["code"] == 500
            fake.dead_reason, fake.die_after = None, 2
            r = await http.post("/v1/chat/completions", json={"model": MODEL, "stream": True, "max_tokens": 10,
                                                              "messages": [{"role": "user", "content": "abc"}]})
            events = [e[len("data: "):] for e in r.text.split("\n\n") if e]
            assert json.loads(events[-2])["error"]["code"] == 500 and events[-1] == "[DONE]"
    run(go())


def test_disconnect_aborts(tokenizer):
    """Closing a stream mid-way cancels the generator, which aborts the engine request."""
    fake = FakeClient(tokenizer, delay=0.01)

    async def go():
        from vllm_lite.entrypoints.openai.serving_completions import OpenAIServingCompletion
        serving = OpenAIServingCompletion(fake, [MODEL])
        req = CompletionRequest(model=MODEL, prompt="abc", max_tokens=50, stream=True)
        prompts = serving._encode(req)
        body = serving.stream_guard(serving._stream(req, "cmpl-x", prompts, [req.to_sampling_params(100)]))
        got = [await body.__anext__() for _ in range(3)]
        assert all(g.startswith("data: ") for g in got)
        await body.aclose()
        assert fake.aborted == ["cmpl-x-0"] and not fake.processor.requests
        # a non-streaming request whose task is cancelled (what the disconnect race does) aborts too
        task = asyncio.ensure_future(serving._full(req, "cmpl-y", prompts, [req.to_sampling_params(100)]))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert "cmpl-y-0" in fake.aborted and not fake.processor.requests
    run(go())


# ---- CLI --------------------------------------------------------------------------------------------------------

def test_cli_flags_and_api_key_env(monkeypatch):
    from vllm_lite.config import EngineConfig
    from vllm_lite.entrypoints.args import engine_kwargs_from_args, resolve_api_key
    from vllm_lite.entrypoints.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["serve", "m", "--port", "9", "--max-model-len", "64", "--no-enable-prefix-caching",
                              "--kv-cache-memory-bytes", "2G", "--device", "cpu", "--enforce-eager",
                              "--served-model-name", "x", "--num-gpu-blocks-override", "7", "--seed", "3",
                              "--no-async-scheduling", "--max-cudagraph-capture-size", "64",
                              "--max-prefill-graph-tokens", "128", "--prefill-graph-requests", "4"])
    cfg = EngineConfig.from_kwargs(**engine_kwargs_from_args(args))
    assert not cfg.scheduler.async_scheduling and cfg.device.max_cudagraph_capture_size == 64
    assert cfg.device.max_prefill_graph_tokens == 128 and cfg.device.prefill_graph_requests == 4
    assert EngineConfig.from_kwargs(**engine_kwargs_from_args(parser.parse_args(["serve"]))).scheduler.async_scheduling
    assert cfg.model.model == "m" and cfg.model.max_model_len == 64 and cfg.model.served_model_name == "x"
    assert not cfg.cache.enable_prefix_caching and cfg.cache.kv_cache_memory_bytes == 2 << 30
    assert cfg.cache.num_gpu_blocks_override == 7 and cfg.device.enforce_eager and cfg.model.seed == 3
    assert engine_kwargs_from_args(parser.parse_args(["serve"]))["model"] == "smollm2-135m-instruct"
    assert engine_kwargs_from_args(parser.parse_args(["serve", "--model", "y"]))["model"] == "y"
    serve_help = parser._subparsers._group_actions[0].choices["serve"].format_help()
    for flag in ("--model", "--host", "--port", "--api-key", "--served-model-name", "--dtype", "--max-model-len",
                 "--max-num-seqs", "--max-num-batched-tokens", "--block-size", "--enable-prefix-caching",
                 "--gpu-memory-utilization", "--enforce-eager", "--device", "--load-format", "--seed",
                 "--num-gpu-blocks-override", "--kv-cache-memory-bytes", "--attention-backend", "--tokenizer",
                 "--async-scheduling", "--max-cudagraph-capture-size", "--max-prefill-graph-tokens",
                 "--prefill-graph-requests"):
        assert flag in serve_help, flag
    monkeypatch.setenv("VLLM_LITE_API_KEY", "from-env")
    assert resolve_api_key(None) == "from-env" and resolve_api_key("flag") == "flag"
    monkeypatch.delenv("VLLM_LITE_API_KEY")
    assert resolve_api_key(None) is None
