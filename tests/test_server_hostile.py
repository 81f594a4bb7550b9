"""Hostile and malformed requests against a real `vllm-lite serve` (CPU, tiny random llama, one server for the
module, started with --api-key so the open routes are tested too): every bad input is a clean 4xx with OpenAI's
error JSON naming the field, never a 5xx, and none of them disturbs a long greedy stream running beside them.
Plus GET /v1/models/{id} through the official openai client, and the offline SamplingParams checks."""
from __future__ import annotations

import asyncio
import json
import math

import httpx
import openai
import pytest

from server_utils import RemoteServer
from tiny_models import make_tiny_model

MODEL = "org/tiny-hostile"  # a served name with a slash, as HF repo ids have
API_KEY = "hostile-key"
MAX_NUM_SEQS = 8
SERVER_ARGS = ["--device", "cpu", "--dtype", "float32", "--max-model-len", "256", "--seed", "0",
               "--served-model-name", MODEL, "--max-num-seqs", str(MAX_NUM_SEQS),
               "--max-request-body-bytes", str(200_000)]
BODY_LIMIT = 200_000
AUTH = {"Authorization": f"Bearer {API_KEY}"}
BIG = 1180591620717411303424  # 2**70, beyond 64 bits
NAN, INF = float("nan"), float("inf")
SURROGATE = "abc \ud800 def"  # a lone surrogate: json.dumps sends it as the escape \ud800


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("hostile-model"), "llama")


@pytest.fixture(scope="module")
def server(model_dir):
    with RemoteServer(model_dir, SERVER_ARGS, api_key=API_KEY, env={"VLLM_LITE_BODY_READ_TIMEOUT_S": "2"}) as srv:
        yield srv


def cmpl(**kw) -> dict:
    return {"model": MODEL, "prompt": "hi", "max_tokens": 4, **kw}


def chat(**kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **kw}


C, CH = "/v1/completions", "/v1/chat/completions"

# (id, path, body (dict, sent with json.dumps: NaN/Infinity literals and \\ud800 escapes; or raw bytes),
#  status, param the error names (None: not checked), text the message contains (None: not checked))
CASES = [
    # integers beyond 64 bits, or otherwise out of range: 400 naming the field
    ("seed-2**70", C, cmpl(seed=BIG), 400, "seed", "seed"),
    ("seed--2**70", C, cmpl(seed=-BIG), 400, "seed", "seed"),
    ("seed-2**64", C, cmpl(seed=2 ** 64), 400, "seed", "seed"),
    ("chat-seed-2**70", CH, chat(seed=BIG), 400, "seed", "seed"),
    ("top_k-2**70", C, cmpl(top_k=BIG), 400, "top_k", "top_k"),
    ("top_k--2", C, cmpl(top_k=-2), 400, "top_k", "top_k"),
    ("n-2**70", C, cmpl(n=BIG), 400, "n", "n="),
    ("n-0", C, cmpl(n=0), 400, "n", "n="),
    ("n--1", C, cmpl(n=-1), 400, "n", "n="),
    ("n-above-max_num_seqs", C, cmpl(n=MAX_NUM_SEQS + 1), 400, "n", str(MAX_NUM_SEQS)),
    ("chat-n-100", CH, chat(n=100), 400, "n", str(MAX_NUM_SEQS)),
    ("max_tokens-2**70", C, cmpl(max_tokens=BIG), 400, "max_tokens", "256"),
    ("max_tokens-above-context", C, cmpl(max_tokens=300), 400, "max_tokens", "256"),
    ("max_tokens-0", C, cmpl(max_tokens=0), 400, "max_tokens", "max_tokens"),
    ("max_tokens--1", C, cmpl(max_tokens=-1), 400, "max_tokens", "max_tokens"),
    ("chat-max_completion_tokens-2**70", CH, chat(max_completion_tokens=BIG), 400, "max_tokens", "256"),
    ("chat-max_tokens-10**6", CH, chat(max_tokens=10 ** 6), 400, "max_tokens", "256"),
    ("min_tokens-2**70", C, cmpl(min_tokens=BIG), 400, "min_tokens", "min_tokens"),
    ("min_tokens--1", C, cmpl(min_tokens=-1), 400, "min_tokens", "min_tokens"),
    ("min_tokens-above-max_tokens", C, cmpl(min_tokens=10), 400, "min_tokens", "min_tokens"),
    ("logprobs-2**70", C, cmpl(logprobs=BIG), 400, "logprobs", "logprobs"),
    ("logprobs-21", C, cmpl(logprobs=21), 400, "logprobs", "logprobs"),
    ("logprobs--1", C, cmpl(logprobs=-1), 400, "logprobs", "logprobs"),
    ("chat-top_logprobs-2**70", CH, chat(logprobs=True, top_logprobs=BIG), 400, "top_logprobs", "top_logprobs"),
    ("chat-top_logprobs-21", CH, chat(logprobs=True, top_logprobs=21), 400, "top_logprobs", "top_logprobs"),
    ("chat-top_logprobs-without-logprobs", CH, chat(top_logprobs=2), 400, "top_logprobs", "top_logprobs"),
    ("stop_token_ids-2**70", C, cmpl(stop_token_ids=[3, BIG]), 400, "stop_token_ids", "stop_token_ids"),
    ("stop_token_ids-negative", C, cmpl(stop_token_ids=[-1]), 400, "stop_token_ids", "stop_token_ids"),
    ("stop_token_ids-out-of-vocab", C, cmpl(stop_token_ids=[10 ** 6]), 400, "stop_token_ids", "vocabulary"),
    ("chat-stop_token_ids-negative", CH, chat(stop_token_ids=[5, -7]), 400, "stop_token_ids", "stop_token_ids"),
    ("prompt-token-2**70", C, cmpl(prompt=[5, BIG]), 400, "prompt", "vocabulary"),
    ("prompt-token-negative", C, cmpl(prompt=[[5], [-1]]), 400, "prompt", "vocabulary"),
    ("detokenize-2**70", "/detokenize", {"tokens": [BIG]}, 400, "tokens", "vocabulary"),
    ("huge-integer-literal", C, b'{"model": "%s", "prompt": "hi", "seed": 1%s}' % (MODEL.encode(), b"0" * 5000),
     400, None, None),
    # lone surrogates (invalid Unicode) in text fields
    ("prompt-surrogate", C, cmpl(prompt=SURROGATE), 400, "prompt", "surrogate"),
    ("prompt-list-surrogate", C, cmpl(prompt=["ok", SURROGATE]), 400, "prompt", "surrogate"),
    ("chat-content-surrogate", CH, chat(messages=[{"role": "user", "content": SURROGATE}]), 400, "messages",
     "surrogate"),
    ("chat-part-surrogate", CH, chat(messages=[{"role": "user", "content": [{"type": "text", "text": SURROGATE}]}]),
     400, "messages", "surrogate"),
    ("chat-name-surrogate", CH, chat(messages=[{"role": "user", "content": "hi", "name": "\udfff"}]), 400,
     "messages", "surrogate"),
    ("stop-surrogate", C, cmpl(stop=["\ud800"]), 400, "stop", "surrogate"),
    ("tokenize-surrogate", "/tokenize", {"prompt": SURROGATE}, 400, "prompt", "surrogate"),
    ("tokenize-messages-surrogate", "/tokenize", {"messages": [{"role": "user", "content": SURROGATE}]}, 400,
     "messages", "surrogate"),
    ("invalid-utf8-body", C, b'{"model": "%s", "prompt": "\xff\xfe"}' % MODEL.encode(), 400, None, None),
    # non-finite or absurd sampling values
    ("temperature-inf", C, cmpl(temperature=INF), 400, "temperature", "temperature"),
    ("temperature--inf", C, cmpl(temperature=-INF), 400, "temperature", "temperature"),
    ("temperature-nan", C, cmpl(temperature=NAN), 400, "temperature", "temperature"),
    ("temperature-1e6", C, cmpl(temperature=1e6), 400, "temperature", "100"),
    ("temperature-1e400-literal", C, b'{"model": "%s", "prompt": "hi", "temperature": 1e400}' % MODEL.encode(),
     400, "temperature", None),
    ("temperature-negative", C, cmpl(temperature=-0.5), 400, "temperature", "temperature"),
    ("temperature-string", C, cmpl(temperature="hot"), 400, "temperature", None),
    ("chat-temperature-nan", CH, chat(temperature=NAN), 400, "temperature", "temperature"),
    ("top_p-nan", C, cmpl(top_p=NAN), 400, "top_p", "top_p"),
    ("top_p-inf", C, cmpl(top_p=INF), 400, "top_p", "top_p"),
    ("top_p-0", C, cmpl(top_p=0), 400, "top_p", "top_p"),
    ("min_p-nan", C, cmpl(min_p=NAN), 400, "min_p", "min_p"),
    ("presence_penalty-nan", C, cmpl(presence_penalty=NAN), 400, "presence_penalty", "presence_penalty"),
    ("frequency_penalty-inf", C, cmpl(frequency_penalty=INF), 400, "frequency_penalty", "frequency_penalty"),
    ("repetition_penalty-inf", C, cmpl(repetition_penalty=INF), 400, "repetition_penalty", "repetition_penalty"),
    ("repetition_penalty-nan", C, cmpl(repetition_penalty=NAN), 400, "repetition_penalty", "repetition_penalty"),
    ("repetition_penalty-0", C, cmpl(repetition_penalty=0), 400, "repetition_penalty", "repetition_penalty"),
    # stops
    ("stop-empty-string-in-list", C, cmpl(stop=[""]), 400, "stop", "stop"),
    ("stop-empty-string", C, cmpl(stop=""), 400, "stop", "stop"),
    ("chat-stop-empty-string", CH, chat(stop=["x", ""]), 400, "stop", "stop"),
    # malformed requests
    ("prompt-empty-list", C, cmpl(prompt=[]), 400, "prompt", None),
    ("prompt-number", C, cmpl(prompt=5), 400, "prompt", None),
    ("messages-empty", CH, chat(messages=[]), 400, "messages", None),
    ("messages-bad-role", CH, chat(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages", "role"),
    ("messages-image-part", CH, chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400,
     "messages", "image_url"),
    ("messages-missing", CH, {"model": MODEL}, 400, "messages", None),
    ("response_format-xml", C, cmpl(response_format={"type": "xml"}), 400, "response_format", "response_format.type"),
    ("suffix", C, cmpl(suffix="end"), 400, "suffix", None),
    ("stream_options-without-stream", C, cmpl(stream_options={"include_usage": True}), 400, "stream_options", None),
    ("request-chat_template", CH, chat(chat_template="{{ 'x' }}"), 400, "chat_template",
     "--trust-request-chat-template"),
    ("tokenize-request-chat_template", "/tokenize", {"messages": [{"role": "user", "content": "hi"}],
                                                     "chat_template": "{{ 'x' }}"}, 400, "chat_template", None),
    ("body-over-limit", C, cmpl(prompt="x" * BODY_LIMIT), 413, "body", "200000"),
    ("unknown-model", C, cmpl(model="no-such-model"), 404, "model", "no-such-model"),
    ("malformed-json", C, b'{"model": ', 400, None, "JSON"),
    ("body-not-an-object", C, b"[1, 2]", 400, None, None),
    ("empty-body", C, b"", 400, None, None),
    ("unknown-model-retrieve", "GET /v1/models/no-such-model", None, 404, "model", "no-such-model"),
]


def _send(http: httpx.Client | httpx.AsyncClient, path: str, body: dict | bytes | None):
    if path.startswith("GET "):
        return http.get(path[4:])
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.post(path, content=content, headers={"content-type": "application/json"})


def _check(case: tuple, r: httpx.Response) -> None:
    name, _, _, status, param, text = case
    assert r.status_code == status, (name, r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, (name, err)
    assert err["code"] == status
    assert err["type"] == {400: "BadRequestError", 404: "NotFoundError", 413: "RequestTooLarge",
                           431: "RequestHeaderFieldsTooLarge"}[status]
    if param is not None:
        assert err["param"] == param, (name, err)
    if text is not None:
        assert text in err["message"], (name, err)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_clean_4xx(server, case):
    with httpx.Client(base_url=server.url_for(), headers=AUTH, timeout=30) as http:
        _check(case, _send(http, case[1], case[2]))


def test_bad_inputs_beside_a_long_greedy_stream(server):
    """All the cases, concurrently, while long greedy streams run back to back until every bad input is answered:
    no 5xx, and each stream's text is identical to the same request run alone."""
    body = cmpl(prompt="Once upon a time", max_tokens=200, temperature=0, stream=True, ignore_eos=True)

    async def stream_text(http: httpx.AsyncClient) -> str:
        parts = []
        async with http.stream("POST", C, json=body) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    parts.append(json.loads(line[6:])["choices"][0]["text"])
        return "".join(parts)

    async def bad_rounds(http: httpx.AsyncClient) -> list:
        responses = []
        for _ in range(2):  # twice over, all at once
            responses += await asyncio.gather(*(_send(http, c[1], c[2]) for c in CASES))
        return responses

    async def go() -> tuple[str, list[str], list]:
        async with httpx.AsyncClient(base_url=server.url_for(), headers=AUTH, timeout=60) as http:
            solo = await stream_text(http)
            bad = asyncio.ensure_future(bad_rounds(http))
            besides = [await stream_text(http)]
            while not bad.done():  # a stream is always running while the bad inputs are in flight
                besides.append(await stream_text(http))
            return solo, besides, await bad

    solo, besides, responses = asyncio.run(go())
    assert len(solo) > 0 and besides == [solo] * len(besides)
    for case, r in zip(CASES * 2, responses):
        _check(case, r)
    assert httpx.get(server.url_for("health")).status_code == 200


def test_models_retrieve_with_openai_client(server):
    client = openai.OpenAI(base_url=server.url_for("v1"), api_key=API_KEY, max_retries=0)
    model = client.models.retrieve(MODEL)
    assert model.id == MODEL and model.object == "model"
    assert [m.id for m in client.models.list().data] == [MODEL]
    with pytest.raises(openai.NotFoundError) as exc:
        client.models.retrieve("no-such-model")
    assert exc.value.body["code"] == 404 if "code" in exc.value.body else exc.value.body["error"]["code"] == 404


def test_metrics_and_health_are_open_with_api_key(server):
    assert httpx.get(server.url_for("health")).status_code == 200
    r = httpx.get(server.url_for("metrics"))
    assert r.status_code == 200 and "vllm:num_requests_running" in r.text
    # the API itself still needs the key
    r = httpx.get(server.url_for("v1", "models"))
    assert r.status_code == 401 and r.json()["error"]["code"] == 401
    assert httpx.get(server.url_for("v1", "models", MODEL), headers={"Authorization": "Bearer nope"}).status_code \
        == 401
    assert httpx.post(server.url_for("v1", "completions"), json=cmpl()).status_code == 401


@pytest.mark.parametrize("kwargs,field", [
    (dict(seed=BIG), "seed"), (dict(seed=-BIG), "seed"), (dict(top_k=BIG), "top_k"), (dict(n=BIG), "n"),
    (dict(max_tokens=BIG), "max_tokens"), (dict(logprobs=BIG), "logprobs"),
    (dict(stop_token_ids=[1, BIG]), "stop_token_ids"), (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(temperature=INF), "temperature"), (dict(temperature=NAN), "temperature"),
    (dict(temperature=1e6), "temperature"), (dict(top_p=NAN), "top_p"), (dict(min_p=NAN), "min_p"),
    (dict(presence_penalty=NAN), "presence_penalty"), (dict(frequency_penalty=INF), "frequency_penalty"),
    (dict(repetition_penalty=INF), "repetition_penalty"), (dict(stop=[""]), "stop"), (dict(stop=["\ud800"]), "stop"),
])
def test_offline_sampling_params_refuse(kwargs, field):
    from vllm_lite import SamplingParams
    with pytest.raises(ValueError, match=rf"^{field}"):
        SamplingParams(**kwargs)


def test_offline_sampling_params_accept_edges():
    from vllm_lite import SamplingParams
    SamplingParams(seed=2 ** 63 - 1, temperature=100.0, top_k=-1, stop_token_ids=[0], stop=["a"])
    SamplingParams(seed=-2 ** 63, temperature=0.0)
    assert math.isfinite(SamplingParams(temperature=2.0).temperature)


def test_body_limit_without_content_length(server):
    """A chunked body (no Content-Length) is cut off at the limit and answered 413; one under it is parsed."""
    def chunks(total: int):
        body = json.dumps(cmpl(prompt="hello " * (total // 6))).encode()
        for i in range(0, len(body), 16384):
            yield body[i:i + 16384]

    with httpx.Client(base_url=server.url_for(), headers=AUTH, timeout=30) as http:
        r = http.post(C, content=chunks(BODY_LIMIT * 3), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == 413
        r = http.post(C, content=chunks(BODY_LIMIT // 2), headers={"content-type": "application/json"})
        assert r.status_code == 400 and "256" in r.json()["error"]["message"]  # parsed: too long for the context
        assert http.get("/health").status_code == 200


def test_header_limits(server):
    """Headers over 64 KiB (or over 256 of them) are a 431 with the error JSON; ordinary ones pass."""
    with httpx.Client(base_url=server.url_for(), headers=AUTH, timeout=30) as http:
        for headers in ({"X-Big": "a" * 100_000}, {f"X-H{i}": "v" for i in range(300)}):
            r = http.get("/v1/models", headers=headers)
            assert r.status_code == 431 and r.json()["error"]["code"] == 431, r.text
        # far beyond: the HTTP parser, which buffers no more than 1 MiB, drops the connection or (when the answer
        # wins the race with the upload) refuses the request
        try:
            r = http.get("/v1/models", headers={"X-Huge": "a" * 4_000_000})
        except httpx.HTTPError:
            pass
        else:
            assert r.status_code in (400, 431), (r.status_code, r.text[:200])
        assert http.get("/v1/models", headers={"X-Fine": "a" * 8_000}).status_code == 200
        assert http.get("/health").status_code == 200


def test_offline_llm_refuses_out_of_vocab_stop_token_ids(model_dir):
    from vllm_lite import LLM, SamplingParams
    llm = LLM(model=model_dir, device="cpu", dtype="float32", max_model_len=256)
    with pytest.raises(ValueError, match="^stop_token_ids is invalid: token id 1000000 is out of the vocabulary"):
        llm.generate(["hi"], SamplingParams(max_tokens=2, stop_token_ids=[3, 10 ** 6]), use_tqdm=False)
    assert len(llm.generate(["hi"], SamplingParams(max_tokens=2, stop_token_ids=[3]), use_tqdm=False)) == 1


def test_body_shorter_than_content_length_times_out(server):
    """A body that stops arriving is answered 408 after the read timeout (2 s here), the connection closed."""
    import socket
    import time
    body = json.dumps(cmpl()).encode()
    head = (f"POST {C} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body) + 100}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        t0 = time.monotonic()
        sock.sendall(head + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        elapsed = time.monotonic() - t0
    assert data.startswith(b"HTTP/1.1 408"), data[:300]
    assert b'"code":408' in data and 1.5 < elapsed < 15, (elapsed, data[-300:])
    assert httpx.get(server.url_for("health")).status_code == 200
