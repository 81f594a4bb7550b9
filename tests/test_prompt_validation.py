"""One prompt check (vllm_lite.inputs.validate_prompt) for the offline LLM and the OpenAI server: the same bad
prompts (empty, longer than max_model_len, an id outside [0, vocab)) are a ValueError from `LLM.generate` and a 400
with the same message from the server, and good requests keep working on both."""
from __future__ import annotations

import asyncio

import httpx
import pytest
from test_openai_protocol import FakeClient

from vllm_lite import LLM, SamplingParams
from vllm_lite.entrypoints.openai.api_server import build_app
from vllm_lite.inputs import check_token_ids, validate_prompt

MAX_LEN = 64


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from tiny_models import make_tiny_model
    return LLM(make_tiny_model(tmp_path_factory.mktemp("validate"), "llama"), device="cpu", dtype="float32",
               max_model_len=MAX_LEN)


def _bad_prompts(vocab: int) -> dict[str, list[int]]:
    return {"out of vocabulary": [5, vocab, 6], "negative": [5, -1], "too long": [5] * (MAX_LEN + 1), "empty": []}


def test_bounds():
    validate_prompt([0, 9], 2, 10)
    for ids, match in (([], "empty"), ([1, 2, 3], "3 tokens.*2 tokens"), ([10], "token id 10"),
                       ([3, -2], "token id -2")):
        with pytest.raises(ValueError, match=match):
            validate_prompt(ids, 2, 10)
    check_token_ids([], 10)
    with pytest.raises(ValueError, match="token id 11 is out of the vocabulary \\(size 10\\)"):
        check_token_ids([0, 11], 10)


def test_llm_and_server_refuse_the_same_prompts(llm):
    vocab = llm.info.vocab_size
    assert vocab == llm.info.hf_config.vocab_size
    offline: dict[str, str] = {}
    for name, ids in _bad_prompts(vocab).items():
        with pytest.raises(ValueError) as exc:
            llm.generate({"prompt_token_ids": ids}, use_tqdm=False)
        offline[name] = str(exc.value)
    ok = SamplingParams(max_tokens=3, ignore_eos=True)
    assert len(llm.generate({"prompt_token_ids": [5, vocab - 1]}, ok, use_tqdm=False)[0].outputs[0].token_ids) == 3

    fake = FakeClient(llm.get_tokenizer())
    fake.info = llm.info  # the same resolved model (max_model_len, vocab_size) as the LLM's
    app = build_app(fake, "tiny")

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            for name, ids in _bad_prompts(vocab).items():
                r = await http.post("/v1/completions", json={"model": "tiny", "prompt": [ids], "max_tokens": 1})
                err = r.json()["error"]
                assert r.status_code == 400 and err["type"] == "BadRequestError" and err["param"] == "prompt", name
                assert err["message"] == f"prompt is invalid: {offline[name]}", name
            r = await http.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 1, "messages": [
                {"role": "user", "content": "hello " * MAX_LEN}]})
            err = r.json()["error"]
            assert r.status_code == 400 and err["param"] == "messages" and f"{MAX_LEN} tokens" in err["message"]
            r = await http.post("/detokenize", json={"tokens": [1, vocab]})
            assert r.status_code == 400 and "out of the vocabulary" in r.json()["error"]["message"]
            # a prompt of exactly max_model_len passes the shared check but leaves no room to generate (server only)
            r = await http.post("/v1/completions", json={"model": "tiny", "prompt": [5] * MAX_LEN})
            assert r.status_code == 400 and "no room" in r.json()["error"]["message"]
            r = await http.post("/v1/completions", json={"model": "tiny", "prompt": [5, vocab - 1], "max_tokens": 2})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    asyncio.run(go())
