"""The evals' OpenAI-compatible client: many requests at once (bounded by --max-concurrency) with a progress bar,
each answer kept with its tokens and top logprobs so the engine can be compared with a reference token by token.
A failed request is recorded with its error instead of stopping the run (the report counts them)."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class Answer:
    """One engine answer: text, its tokens (as the server prints them) with the top logprobs at each position."""
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tokens: list[str] = field(default_factory=list)
    top_logprobs: list[dict[str, float]] = field(default_factory=list)
    latency_s: float = 0.0
    error: str | None = None


def make_client(base_url: str, api_key: str | None, timeout_s: float = 3600.0) -> Any:
    """An AsyncOpenAI client without retries (a retried request would hide an engine error and skew the timing)."""
    import httpx
    from openai import AsyncOpenAI

    from vllm_lite.entrypoints.args import CLIENT_KEEP_ALIVE_S
    limits = httpx.Limits(max_connections=4096, max_keepalive_connections=4096, keepalive_expiry=CLIENT_KEEP_ALIVE_S)
    return AsyncOpenAI(base_url=base_url, api_key=api_key or "EMPTY", max_retries=0, timeout=timeout_s,
                       http_client=httpx.AsyncClient(limits=limits, timeout=timeout_s))


async def tokenize_messages(http: Any, base_url: str, api_key: str | None, model: str,
                            messages: list[dict[str, str]]) -> tuple[int, int]:
    """(prompt tokens, the server's max_model_len) of a chat prompt, through the server's /tokenize (vLLM's)."""
    url = base_url.rstrip("/").removesuffix("/v1") + "/tokenize"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    resp = await http.post(url, json={"model": model, "messages": messages}, headers=headers)
    resp.raise_for_status()
    body = resp.json()
    return int(body["count"]), int(body["max_model_len"])


async def served_model(client: Any, model: str | None) -> str:
    """The model name to send: the one given, else the first the server lists."""
    if model:
        return model
    models = await client.models.list()
    return models.data[0].id


async def complete(client: Any, model: str, prompt: str | list[dict[str, str]], chat: bool,
                   num_logprobs: int | None, **params: Any) -> Answer:
    """One /v1/completions request, or with `chat` one /v1/chat/completions request (a string prompt is the one user
    message, a list is the messages)."""
    start = time.perf_counter()
    out = Answer()
    try:
        if chat:
            extra = {"logprobs": True, "top_logprobs": num_logprobs} if num_logprobs is not None else {}
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            resp = await client.chat.completions.create(model=model, messages=messages, **extra, **params)
            choice = resp.choices[0]
            out.text = choice.message.content or ""
            content = choice.logprobs.content if choice.logprobs is not None else None
            for item in content or ():
                out.tokens.append(item.token)
                out.top_logprobs.append({t.token: t.logprob for t in item.top_logprobs})
        else:
            extra = {"logprobs": num_logprobs} if num_logprobs is not None else {}
            resp = await client.completions.create(model=model, prompt=prompt, **extra, **params)
            choice = resp.choices[0]
            out.text = choice.text
            if choice.logprobs is not None:
                out.tokens = list(choice.logprobs.tokens or [])
                out.top_logprobs = [dict(d or {}) for d in choice.logprobs.top_logprobs or []]
        out.finish_reason = choice.finish_reason
        if resp.usage is not None:
            out.prompt_tokens = resp.usage.prompt_tokens
            out.completion_tokens = resp.usage.completion_tokens
    except Exception as exc:  # noqa: BLE001 - recorded per question, counted in the report
        out.error = f"{type(exc).__name__}: {exc}"
    out.latency_s = time.perf_counter() - start
    return out


async def gather_bounded(items: Sequence[T], worker: Callable[[T], Awaitable[R]], max_concurrency: int,
                         desc: str) -> list[R]:
    """worker(item) for every item, at most max_concurrency at a time, in input order, with a tqdm progress bar."""
    from tqdm.auto import tqdm
    sem = asyncio.Semaphore(max(1, max_concurrency))
    bar = tqdm(total=len(items), desc=desc, unit="req", dynamic_ncols=True)

    async def one(item: T) -> R:
        async with sem:
            result = await worker(item)
        bar.update(1)
        return result

    try:
        return list(await asyncio.gather(*(one(i) for i in items)))
    finally:
        bar.close()
