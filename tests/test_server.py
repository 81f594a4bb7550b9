"""A real `vllm-lite serve` subprocess (CPU, tiny random llama) driven through the official openai client:
shapes, streaming, n, logprobs, stops, usage, 32 concurrent greedy requests equal to the offline LLM, bad inputs
beside a long generation, disconnect aborts, API key, SIGTERM and engine-core death with no process left."""
from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from server_utils import RemoteServer, alive, children, free_port, kill_midstream, wait_gone
from tiny_models import make_tiny_model

SERVER_ARGS = ["--device", "cpu", "--dtype", "float32", "--max-model-len", "256", "--seed", "0"]
OFFLINE_KWARGS = dict(device="cpu", dtype="float32", max_model_len=256, seed=0)
PROMPTS = [f"Question {i}: what is {i} plus {i * 3}? Hello world" for i in range(32)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("server-model"), "llama")


@pytest.fixture(scope="module")
def server(model_dir):
    with RemoteServer(model_dir, SERVER_ARGS) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url_for("v1"), api_key="EMPTY", max_retries=0)


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))


def test_routes(server, model_dir):
    assert httpx.get(server.url_for("health")).status_code == 200
    assert httpx.get(server.url_for("version")).json()["version"]
    models = httpx.get(server.url_for("v1", "models")).json()
    assert models["data"][0]["id"] == model_dir and models["data"][0]["max_model_len"] == 256
    ids = httpx.post(server.url_for("tokenize"), json={"prompt": "Hello world"}).json()["tokens"]
    assert httpx.post(server.url_for("detokenize"), json={"tokens": ids}).json()["prompt"] == "Hello world"
    text = httpx.get(server.url_for("metrics")).text
    for name in ("vllm:num_requests_running", "vllm:kv_cache_usage_perc", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total", "vllm:time_to_first_token_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_bucket", "vllm:prefix_cache_hits_total"):
        assert name in text


def test_request_phase_histograms(server, client, model_dir):
    """vLLM's request-level phases from the engine core's clock: one finished request adds one observation to each,
    prefill + decode = inference (scheduled -> finished), and the whole is within the client's own latency."""
    metrics = server.url_for("metrics")
    names = [f"vllm:request_{p}_time_seconds" for p in ("queue", "prefill", "decode", "inference")]

    def read() -> dict[str, tuple[float, float]]:
        text = httpx.get(metrics).text
        return {n: (_metric(text, n + "_count"), _metric(text, n + "_sum")) for n in names}

    before = read()
    start = time.monotonic()
    r = client.completions.create(model=model_dir, prompt="Hello world", max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    elapsed = time.monotonic() - start
    assert r.usage.completion_tokens == 12
    after = read()
    delta = {n: (after[n][0] - before[n][0], after[n][1] - before[n][1]) for n in names}
    assert all(count == 1 for count, _ in delta.values()), delta
    queue, prefill, decode, inference = (delta[n][1] for n in names)
    assert min(queue, prefill, decode) >= 0 and prefill > 0 and decode > 0
    assert prefill + decode == pytest.approx(inference, abs=1e-3)
    assert queue + inference <= elapsed
    # A request that a stop string ends in the API server (the engine core then aborts it) is observed too.
    stop = next(c for c in r.choices[0].text[4:] if not c.isspace())
    r2 = client.completions.create(model=model_dir, prompt="Hello world", max_tokens=12, temperature=0, stop=[stop],
                                   extra_body={"ignore_eos": True})
    assert r2.choices[0].finish_reason == "stop" and r2.usage.completion_tokens < 12
    deadline = time.monotonic() + 10
    while read()[names[-1]][0] < after[names[-1]][0] + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(read()[n][0] == after[n][0] + 1 for n in names)


def test_completions(client, model_dir):
    r = client.completions.create(model=model_dir, prompt="Hello world", max_tokens=8, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    c = r.choices[0]
    assert r.id.startswith("cmpl-") and c.finish_reason == "length"
    assert r.usage.completion_tokens == 8 and r.usage.total_tokens == r.usage.prompt_tokens + 8
    assert len(c.logprobs.tokens) == 8 and all(1 <= len(t) <= 4 for t in c.logprobs.top_logprobs)
    assert all(lp <= 0 for lp in c.logprobs.token_logprobs)
    # the sampled greedy token is the top-1
    assert all(max(t.values()) == pytest.approx(lp, abs=1e-4)
               for t, lp in zip(c.logprobs.top_logprobs, c.logprobs.token_logprobs))
    r2 = client.completions.create(model=model_dir, prompt="Hello world", max_tokens=8, temperature=0.8, n=2,
                                   seed=1, echo=True, extra_body={"ignore_eos": True})
    assert [x.index for x in r2.choices] == [0, 1] and r2.usage.completion_tokens == 16
    assert all(x.text.startswith("Hello world") for x in r2.choices)
    # streaming gives the same greedy text, then usage
    stream = client.completions.create(model=model_dir, prompt="Hello world", max_tokens=8, temperature=0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == c.text
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-1].choices == []


def test_stop_strings(client, model_dir):
    base = client.completions.create(model=model_dir, prompt="Once upon a time", max_tokens=30, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = base[len(base) // 2: len(base) // 2 + 2]
    assert stop
    for stream in (False, True):
        kw = dict(model=model_dir, prompt="Once upon a time", max_tokens=30, temperature=0, stop=[stop],
                  extra_body={"ignore_eos": True})
        if stream:
            chunks = list(client.completions.create(stream=True, **kw))
            text = "".join(ch.choices[0].text for ch in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            choice = client.completions.create(**kw).choices[0]
            text, finish = choice.text, choice.finish_reason
        assert text == base[:base.find(stop)] and finish == "stop"


def test_chat(client, model_dir):
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is the capital?"}]
    r = client.chat.completions.create(model=model_dir, messages=msgs, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=2, extra_body={"ignore_eos": True})
    choice = r.choices[0]
    assert r.id.startswith("chatcmpl-") and choice.message.role == "assistant"
    assert r.usage.completion_tokens == 6 and choice.finish_reason == "length"
    assert len(choice.logprobs.content) == 6 and all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    stream = client.chat.completions.create(model=model_dir, messages=msgs, max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == choice.message.content
    assert chunks[-1].usage.completion_tokens == 6
    r = client.chat.completions.create(model=model_dir, messages=msgs, max_completion_tokens=5, n=2,
                                       temperature=1.0, seed=3, extra_body={"ignore_eos": True})
    assert len(r.choices) == 2 and r.usage.completion_tokens == 10
    # content as a list of text parts
    r = client.chat.completions.create(model=model_dir, max_tokens=2, messages=[
        {"role": "user", "content": [{"type": "text", "text": "What is the capital?"}]}])
    assert r.choices[0].finish_reason in ("stop", "length")


def test_concurrent_greedy_equals_offline(server, model_dir):
    from vllm_lite import LLM, SamplingParams

    async def run_all():
        aclient = openai.AsyncOpenAI(base_url=server.url_for("v1"), api_key="EMPTY", max_retries=0)
        rs = await asyncio.gather(*(aclient.completions.create(model=model_dir, prompt=p, max_tokens=16,
                                                               temperature=0) for p in PROMPTS))
        await aclient.close()
        return rs

    t0 = time.perf_counter()
    results = asyncio.run(run_all())
    elapsed = time.perf_counter() - t0
    llm = LLM(model=model_dir, **OFFLINE_KWARGS)
    offline = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    for r, o in zip(results, offline):
        assert r.choices[0].text == o.outputs[0].text
        assert r.choices[0].finish_reason == o.outputs[0].finish_reason
        assert r.usage.completion_tokens == len(o.outputs[0].token_ids)
    print(f"32 concurrent completions in {elapsed:.2f} s")


def test_bad_inputs_beside_long_generation(server, model_dir):
    async def bad_inputs(http):
        r = await http.post("/v1/completions", json={"model": model_dir, "prompt": "hello " * 300, "max_tokens": 4})
        err = r.json()["error"]
        assert r.status_code == 400 and "256" in err["message"]
        n_prompt = len((await http.post("/tokenize", json={"prompt": "hello " * 300})).json()["tokens"])
        assert str(n_prompt) in err["message"]
        r = await http.post("/v1/completions", json={"model": model_dir, "prompt": "hi", "max_tokens": 300})
        assert r.status_code == 400 and "256" in r.json()["error"]["message"]
        for ids in ([5, -1], [5, 10 ** 6]):  # the offline LLM's bounds (vllm_lite.inputs), refused before the engine
            r = await http.post("/v1/completions", json={"model": model_dir, "prompt": ids, "max_tokens": 2})
            assert r.status_code == 400 and f"token id {ids[1]} is out of the vocabulary" in r.json()["error"]["message"]
        r = await http.post("/v1/chat/completions", json={"model": model_dir, "temperature": -0.5,
                                                          "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and "temperature" in r.json()["error"]["message"]
        r = await http.post("/v1/completions", json={"model": "no-such-model", "prompt": "hi"})
        assert r.status_code == 404 and r.json()["error"]["code"] == 404
        r = await http.post("/v1/completions", content=b'{"model": ', headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "BadRequestError"

    async def go():
        aclient = openai.AsyncOpenAI(base_url=server.url_for("v1"), api_key="EMPTY", max_retries=0)
        results, overlapped = [], False
        async with httpx.AsyncClient(base_url=server.url_for()) as http:
            # The tiny model is fast: retry until one round of bad inputs ran wholly inside a long generation.
            for _ in range(5):
                long = asyncio.ensure_future(aclient.completions.create(
                    model=model_dir, prompt="Hello world", max_tokens=200, temperature=0,
                    extra_body={"ignore_eos": True}))
                await asyncio.sleep(0.05)
                started_inside = not long.done()
                await bad_inputs(http)
                overlapped = started_inside and not long.done()
                results.append(await long)
                if overlapped:
                    break
        await aclient.close()
        return results, overlapped

    results, overlapped = asyncio.run(go())
    assert overlapped, "the long generation always finished before the bad inputs were answered"
    for result in results:
        assert result.usage.completion_tokens == 200 and result.choices[0].finish_reason == "length"


def test_disconnect_aborts_request(server, model_dir):
    metrics = server.url_for("metrics")
    before = _metric(httpx.get(metrics).text, "vllm:kv_cache_usage_perc")

    def settled() -> str:
        deadline = time.monotonic() + 10
        while True:
            text = httpx.get(metrics).text
            if _metric(text, "vllm:num_requests_running") == 0 or time.monotonic() > deadline:
                return text
            time.sleep(0.1)

    # The tiny model is fast: retry until the client closed the stream before the request could finish by itself.
    for _ in range(5):
        gen_before = _metric(settled(), "vllm:generation_tokens_total")
        with httpx.Client(timeout=30) as http:
            with http.stream("POST", server.url_for("v1", "completions"),
                             json={"model": model_dir, "prompt": "Hello world", "max_tokens": 240, "stream": True,
                                   "temperature": 0, "ignore_eos": True}) as resp:
                lines = resp.iter_lines()
                assert any(next(lines).startswith("data: {") for _ in range(3))
        text = settled()
        generated = _metric(text, "vllm:generation_tokens_total") - gen_before
        if generated < 240:
            break
    assert generated < 240, "the request always finished before the client closed the stream"
    # Aborted: nothing runs, its KV blocks are free again, and it generates nothing more.
    assert _metric(text, "vllm:num_requests_running") == 0
    assert _metric(text, "vllm:kv_cache_usage_perc") <= before + 1e-9
    time.sleep(0.5)
    assert _metric(httpx.get(metrics).text, "vllm:generation_tokens_total") - gen_before == generated


def test_api_key_and_sigterm(model_dir):
    srv = RemoteServer(model_dir, SERVER_ARGS, api_key="test-key")
    try:
        assert httpx.get(srv.url_for("health")).status_code == 200
        r = httpx.get(srv.url_for("v1", "models"))
        assert r.status_code == 401 and r.json()["error"]["code"] == 401
        bad = openai.OpenAI(base_url=srv.url_for("v1"), api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=srv.url_for("v1"), api_key="test-key", max_retries=0)
        assert good.completions.create(model=model_dir, prompt="hi", max_tokens=2).usage.completion_tokens >= 1
        tree = srv.tree()
        assert len(tree) >= 3, "expected API server, engine core and a worker"
        os.kill(srv.pid, signal.SIGTERM)
        srv.proc.wait(30)
        assert wait_gone(tree, 15) == [], "processes left behind after SIGTERM"
    finally:
        srv.close()


@pytest.mark.parametrize("victim", ["engine_core", "worker"])
def test_process_death_fails_requests_and_exits(model_dir, victim):
    srv = RemoteServer(model_dir, SERVER_ARGS)
    try:
        tree = srv.tree()
        core = srv.engine_core_pid()
        target = core if victim == "engine_core" else children(core)[0]
        aclient = openai.OpenAI(base_url=srv.url_for("v1"), api_key="EMPTY", max_retries=0, timeout=30)
        stream = aclient.completions.create(model=model_dir, prompt="Hello", max_tokens=240, stream=True,
                                            extra_body={"ignore_eos": True})
        it = iter(stream)
        next(it)
        assert kill_midstream(srv, target, [it]).status_code == 503
        assert srv.proc.wait(30) != 0
        assert not alive(target)
        assert wait_gone(tree, 15) == [], f"processes left behind after the {victim} died"
    finally:
        srv.close()


def test_default_model_with_no_model_argument():
    """`vllm-lite serve` with no model serves SmolLM2-135M-Instruct; the README's curl and openai examples work."""
    with RemoteServer(None, ["--device", "cpu", "--max-model-len", "1024"]) as srv:
        models = httpx.get(srv.url_for("v1", "models")).json()
        assert [m["id"] for m in models["data"]] == ["smollm2-135m-instruct"]
        body = {"model": "smollm2-135m-instruct", "max_tokens": 32, "temperature": 0,
                "messages": [{"role": "user", "content": "What is the capital of France?"}]}
        r = httpx.post(srv.url_for("v1", "chat", "completions"), json=body, timeout=60)
        assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["message"]["content"]
        client = openai.OpenAI(base_url=srv.url_for("v1"), api_key="EMPTY", max_retries=0)
        resp = client.chat.completions.create(model="smollm2-135m-instruct", temperature=0, max_tokens=32,
                                              messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in resp.choices[0].message.content


def test_cli_complete_and_chat(server, model_dir):
    """`vllm-lite complete` prints a completion; `vllm-lite chat` streams answers and keeps the conversation."""
    import subprocess
    import sys
    url = server.url_for("v1")
    done = subprocess.run([sys.executable, "-m", "vllm_lite", "complete", "--url", url, "--max-tokens", "8",
                           "--temperature", "0", "Hello world"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    offline = openai.OpenAI(base_url=url, api_key="EMPTY").completions.create(
        model=model_dir, prompt="Hello world", max_tokens=8, temperature=0).choices[0].text
    assert done.stdout.strip() == offline.strip()
    chat = subprocess.run([sys.executable, "-m", "vllm_lite", "chat", "--url", url, "--max-tokens", "6"],
                          input="Hi there\nAnd again\nquit\n", capture_output=True, text=True, timeout=60)
    assert chat.returncode == 0, chat.stderr
    assert len(chat.stdout.strip()) > 0


def _session_members(sid: int) -> list[int]:
    """Live processes of session `sid` (zombies excluded)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                found.append(int(name))
    return found


def test_bad_model_fails_clearly_and_stops_the_early_engine(tmp_path):
    """The worker resolves the model (the API server never does): a model that cannot be resolved still gives one
    clear error line, a non-zero exit, and no process left behind."""
    missing = str(tmp_path / "no-such-model")
    proc = subprocess.Popen([sys.executable, "-m", "vllm_lite", "serve", missing, "--device", "cpu",
                             "--port", str(free_port())], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, (out, err)
    assert "vllm-lite serve: error:" in err and "no-such-model" in err, err
    assert "Traceback" not in err, err  # the worker resolves the model; its failure is still one line
    deadline = time.monotonic() + 15
    while _session_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _session_members(proc.pid) == []


def _exit_at_once() -> None:
    sys.exit(3)


def test_engine_core_dead_before_handshake_fails_startup(model_dir, tmp_path):
    """An engine core that dies before it says anything (e.g. a crash while importing) fails start() with a clear
    error instead of waiting forever for the model description."""
    import multiprocessing as mp

    from vllm_lite.config import EngineConfig
    from vllm_lite.engine.async_client import AsyncEngineClient, EngineDeadError
    from vllm_lite.engine.core_launch import EngineCoreProcess

    config = EngineConfig.from_kwargs(model=model_dir, device="cpu")
    proc = mp.get_context("spawn").Process(target=_exit_at_once)
    proc.start()
    sock_dir = str(tmp_path / "socks")
    os.makedirs(sock_dir)
    core = EngineCoreProcess(proc, sock_dir, f"ipc://{sock_dir}/in", f"ipc://{sock_dir}/out")
    client = AsyncEngineClient(config, core=core)

    async def start() -> None:
        await asyncio.wait_for(client.start(), 30)
    try:
        with pytest.raises(EngineDeadError, match="exited during startup"):
            asyncio.run(start())
    finally:
        client.shutdown()
