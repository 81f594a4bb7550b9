"""/v1/completions, plus the shared request plumbing (model check, context-window checks, engine iteration with
metrics, disconnect handling, SSE framing) used by serving_chat."""
from __future__ import annotations

import asyncio
import functools
import json
import logging
from typing import Any, AsyncIterator, Awaitable, Sequence

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from vllm_lite.entrypoints.openai.errors import (APIError, EngineDeadError, ServerStoppingError, api_error_response,
                                                 bad_request, engine_dead_message, engine_error_status,
                                                 error_response, sse_error)
from vllm_lite.entrypoints.openai.protocol import (CompletionLogProbs, CompletionRequest, CompletionResponse,
                                                   CompletionResponseChoice, CompletionStreamResponse, UsageInfo,
                                                   random_uuid)
from vllm_lite.inputs import check_token_ids, validate_prompt
from vllm_lite.sampling_params import SamplingParams, StructuredOutputsParams
from vllm_lite.structured_output.validate import validate_structured_outputs
from vllm_lite.tokenizer import max_token_bytes, min_token_count

logger = logging.getLogger("vllm_lite.api_server")

DEFAULT_MAX_N = 256  # SchedulerConfig.max_num_seqs' default
LOGPROB_FLOOR = -9999.0  # -inf is not valid JSON; vLLM clamps the same way


class SSEResponse(StreamingResponse):
    """StreamingResponse that always closes its body iterator (so the engine request is aborted promptly when the
    client goes away, instead of whenever the async generator is garbage collected)."""

    def __init__(self, content: AsyncIterator[str], **kwargs: Any) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}, **kwargs)

    async def stream_response(self, send: Any) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[union-attr]


def sse(obj: BaseModel | dict) -> str:
    data = obj.model_dump_json() if isinstance(obj, BaseModel) else json.dumps(obj)
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"


async def _listen_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_until_disconnect(request: Request, coro: Awaitable[Response]) -> Response:
    """Run a non-streaming handler; if the client disconnects first, cancel it (which aborts its engine requests)."""
    task = asyncio.ensure_future(coro)
    listener = asyncio.ensure_future(_listen_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        listener.cancel()
        raise
    if task in done:
        listener.cancel()
        return task.result()
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):
        pass
    logger.info("client disconnected; request aborted")
    return Response(status_code=499)


async def merge_async_iterators(iterators: Sequence[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """Yield (index, item) from several async iterators as items arrive; closing this cancels all of them."""
    if len(iterators) == 1:
        it = iterators[0]
        try:
            async for item in it:
                yield 0, item
        finally:
            await it.aclose()  # type: ignore[attr-defined]
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def produce(i: int, it: AsyncIterator[Any]) -> None:
        try:
            async for item in it:
                queue.put_nowait((i, item, None))
            queue.put_nowait((i, _END, None))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((i, None, exc))

    tasks = [asyncio.ensure_future(produce(i, it)) for i, it in enumerate(iterators)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item, exc = await queue.get()
            if exc is not None:
                raise exc
            if item is _END:
                remaining -= 1
                continue
            yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


_END = object()


class OpenAIServing:
    """What the completion and chat handlers share."""

    def __init__(self, client: Any, served_model_names: list[str], metrics: Any | None = None) -> None:
        self.client = client
        self.tokenizer = client.tokenizer
        self.served_model_names = served_model_names
        self.model_name = served_model_names[0]
        self.metrics = metrics
        self.max_model_len = int(client.info.max_model_len)
        self.vocab_size = int(client.info.vocab_size)  # the LLM's bound too (vllm_lite.inputs)
        # n above the scheduler's batch could never run its sequences together; the API server builds the same
        # EngineConfig it hands the engine, so it knows max_num_seqs (a stand-in client without one: 256)
        config = getattr(client, "config", None)
        self.max_n = int(config.scheduler.max_num_seqs) if config is not None else DEFAULT_MAX_N

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.served_model_names:
            raise APIError(f"The model `{name}` does not exist.", 404, "model")

    @functools.cached_property
    def token_bytes(self) -> int | None:
        """The most prompt bytes one token stands for, where provable (vllm_lite.tokenizer.max_token_bytes)."""
        return max_token_bytes(self.tokenizer) if self.tokenizer is not None else None

    def check_text_size(self, text: str, what: str = "prompt") -> None:
        """Refuse, before tokenizing it, a text that has at least max_model_len tokens by its byte count alone (an
        8 MB prompt would otherwise hold the GIL, and so the event loop, for tenths of a second in the tokenizer)."""
        limit = self.max_model_len
        if len(text) < limit:
            return
        n = min_token_count(text, self.token_bytes)
        if n >= limit:
            raise APIError(f"This model's maximum context length is {limit} tokens (max_model_len). However, your "
                           f"request has at least {n} input tokens in the {what} ({len(text)} characters), which "
                           f"leaves no room for generated tokens. Please reduce the length of the {what}.", 400, what)

    def check_prompt(self, ids: list[int], requested_max_tokens: int | None, what: str = "prompt") -> int:
        """Validate the prompt (vllm_lite.inputs.validate_prompt, the offline LLM's checks) and its room for output
        in the context window; return the room left."""
        try:
            validate_prompt(ids, self.max_model_len, self.vocab_size)
        except ValueError as exc:
            raise APIError(f"{what} is invalid: {exc}", 400, what) from None
        n, limit = len(ids), self.max_model_len
        if n >= limit:
            raise APIError(f"This model's maximum context length is {limit} tokens (max_model_len). However, your "
                           f"request has {n} input tokens in the {what}, which leaves no room for generated tokens. "
                           f"Please reduce the length of the {what}.", 400, what)
        if requested_max_tokens is not None and n + requested_max_tokens > limit:
            raise APIError(f"This model's maximum context length is {limit} tokens (max_model_len). However, you "
                           f"requested {n + requested_max_tokens} tokens ({n} in the {what}, "
                           f"{requested_max_tokens} in the completion). Please reduce the length of the {what} or "
                           f"completion.", 400, "max_tokens")
        return limit - n

    def check_request(self, request: Any) -> None:
        """Checks that need the server's numbers: n against max_num_seqs, stop_token_ids against the vocabulary."""
        request.check()
        if isinstance(request.n, int) and request.n > self.max_n:
            raise APIError(f"n={request.n} is invalid: it must be at most {self.max_n} (the server's "
                           f"--max-num-seqs)", 400, "n")
        try:
            check_token_ids([t for t in request.stop_token_ids or () if isinstance(t, int) and t >= 0],
                            self.vocab_size)
        except ValueError as exc:
            raise APIError(f"stop_token_ids is invalid: {exc}", 400, "stop_token_ids") from None

    def check_structured(self, structured: StructuredOutputsParams | None) -> None:
        """A schema, regex or grammar that xgrammar cannot enforce is a ValueError naming it (a 400), before
        admission: nothing a request sends reaches the engine core's compiler unchecked."""
        if structured is not None:
            validate_structured_outputs(structured)

    def check_params(self, params: SamplingParams) -> None:
        """Checks that need the tokenizer or the vocabulary: bad_words tokenized, every token id in range."""
        params.resolve_bad_words(self.tokenizer)
        params.check_vocab(self.vocab_size)

    def check_alive(self) -> None:
        """Before tokenizing and again after (a shutdown may have ended meanwhile: 503)."""
        if getattr(self.client, "dead_reason", None) is not None:
            raise EngineDeadError(self.client.dead_reason)
        if getattr(self.client, "stopping", None) is not None:
            raise ServerStoppingError(self.client.stopping)

    async def generate(self, request_id: str, prompt: str | None, ids: list[int], params: Any) -> AsyncIterator[Any]:
        """client.generate with metrics; closing it (or cancelling its consumer) aborts the engine request."""
        if self.metrics is not None:
            self.metrics.on_request_start(len(ids))
        gen = self.client.generate(request_id, prompt, ids, params)
        try:
            async for state in gen:
                if state.finished and self.metrics is not None:
                    self.metrics.on_request_finished(state)
                yield state
        finally:
            await gen.aclose()

    @staticmethod
    async def collect(gen: AsyncIterator[Any]) -> Any:
        last = None
        async for state in gen:
            last = state
        return last

    async def handle(self, raw_request: Request, build: Any) -> Response:
        """Run `build()` (validation + generation), mapping errors to the OpenAI JSON; races client disconnects."""
        async def guarded() -> Response:
            try:
                return await build()
            except APIError as exc:
                return api_error_response(exc)
            except EngineDeadError as exc:
                return error_response(engine_dead_message(exc), engine_error_status(exc))
            except ValueError as exc:
                return api_error_response(bad_request(exc))
        return await run_until_disconnect(raw_request, guarded())

    async def stream_guard(self, body: AsyncIterator[str]) -> AsyncIterator[str]:
        """Forward SSE events; an error mid-stream becomes an SSE error event followed by [DONE]."""
        try:
            async for event in body:
                yield event
        except EngineDeadError as exc:
            yield sse_error(engine_dead_message(exc), engine_error_status(exc))
            yield SSE_DONE
        except (APIError, ValueError) as exc:
            err = exc if isinstance(exc, APIError) else bad_request(exc)
            yield sse_error(err.message, err.status)
            yield SSE_DONE
        except Exception as exc:  # noqa: BLE001
            logger.exception("error while streaming")
            yield sse_error(f"internal error: {exc!r}", 500)
            yield SSE_DONE
        finally:
            await body.aclose()  # type: ignore[attr-defined]


# ---- logprob shaping ----------------------------------------------------------------------------------------------

def _clamp(lp: float) -> float:
    return lp if lp > LOGPROB_FLOOR else LOGPROB_FLOOR


def sorted_top(d: dict, num: int) -> list[tuple[int, Any]]:
    """The `num` highest-ranked (token, Logprob) entries of a position's logprob dict."""
    items = list(d.items())
    if all(lp.rank is not None for _, lp in items):
        items.sort(key=lambda kv: kv[1].rank)
    else:
        items.sort(key=lambda kv: -kv[1].logprob)
    return items[:num]


def token_text(tokenizer: Any, token: int, lp: Any) -> str:
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    return tokenizer.decode([token]) if tokenizer is not None else str(token)


def completion_logprobs(tokenizer: Any, token_ids: list[int], logprobs: list[dict], num: int,
                        start_offset: int) -> CompletionLogProbs:
    out = CompletionLogProbs()
    offset = start_offset
    for token, d in zip(token_ids, logprobs):
        if d is None:  # an echoed prompt's first token: nothing predicts it (vLLM: null logprob and top)
            text = token_text(tokenizer, token, None)
            out.tokens.append(text)
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            out.text_offset.append(offset)
            offset += len(text)
            continue
        lp = d.get(token)
        text = token_text(tokenizer, token, lp)
        out.tokens.append(text)
        out.token_logprobs.append(_clamp(lp.logprob) if lp is not None else None)
        top: dict[str, float] = {}
        if lp is not None:
            top[text] = _clamp(lp.logprob)
        for tid, tlp in sorted_top(d, num):
            top.setdefault(token_text(tokenizer, tid, tlp), _clamp(tlp.logprob))
        out.top_logprobs.append(top if num > 0 or lp is not None else None)
        out.text_offset.append(offset)
        offset += len(text)
    return out


# ---- /v1/completions ----------------------------------------------------------------------------------------------

class OpenAIServingCompletion(OpenAIServing):

    async def create_completion(self, request: CompletionRequest, raw_request: Request) -> Response:
        async def build() -> Response:
            self.check_model(request.model)
            self.check_request(request)
            self.check_alive()
            structured = request.structured_outputs_params()
            await asyncio.to_thread(self.check_structured, structured)  # a 1 MiB schema parses off the loop too
            prompts = await asyncio.to_thread(self._encode, request)  # a large prompt tokenizes off the loop
            self.check_alive()
            params = [request.to_sampling_params(self.check_prompt(ids, request.max_tokens), structured)
                      for _, ids in prompts]
            for p in params:
                self.check_params(p)
            request_id = f"cmpl-{random_uuid()}"
            if request.stream:
                return SSEResponse(self.stream_guard(self._stream(request, request_id, prompts, params)))
            return await self._full(request, request_id, prompts, params)
        return await self.handle(raw_request, build)

    def _encode(self, request: CompletionRequest) -> list[tuple[str | None, list[int]]]:
        out: list[tuple[str | None, list[int]]] = []
        for p in request.prompts():
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise APIError("text prompts need a tokenizer", 400, "prompt")
                self.check_text_size(p)
                out.append((p, self.tokenizer(p, add_special_tokens=request.add_special_tokens).input_ids))
            elif isinstance(p, list) and all(isinstance(t, int) for t in p):
                out.append((None, list(p)))
            else:
                raise APIError("prompt is invalid: expected a string, a list of strings, a list of token ids or a "
                               "list of lists of token ids", 400, "prompt")
        return out

    def _prompt_text(self, text: str | None, ids: list[int]) -> str:
        if text is not None:
            return text
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    async def _full(self, request: CompletionRequest, request_id: str, prompts: list, params: list) -> Response:
        gens = [self.generate(f"{request_id}-{i}", text, ids, p) for i, ((text, ids), p) in
                enumerate(zip(prompts, params))]
        states = await asyncio.gather(*(self.collect(g) for g in gens))
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for pi, (state, (text, ids)) in enumerate(zip(states, prompts)):
            prompt_tokens += len(ids)
            prefix = self._prompt_text(text, ids) if request.echo else ""
            for seq in state.sequences:
                gen_ids, gen_text = ([], "") if request.echo_only else (seq.token_ids, seq.text)
                completion_tokens += len(gen_ids)
                lps = None
                if request.logprobs is not None and seq.logprobs is not None:
                    lps = completion_logprobs(self.tokenizer, *_echoed(request, ids, state.prompt_logprobs, gen_ids,
                                                                       seq.logprobs), request.logprobs, 0)
                choices.append(CompletionResponseChoice(index=pi * request.n + seq.index, text=prefix + gen_text,
                                                        logprobs=lps, finish_reason=seq.finish_reason,
                                                        stop_reason=seq.stop_reason))
        choices.sort(key=lambda c: c.index)
        usage = UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                          total_tokens=prompt_tokens + completion_tokens)
        resp = CompletionResponse(id=request_id, model=self.model_name, choices=choices, usage=usage)
        return JSONResponse(resp.model_dump())

    async def _stream(self, request: CompletionRequest, request_id: str, prompts: list,
                      params: list) -> AsyncIterator[str]:
        n = request.n
        gens = [self.generate(f"{request_id}-{i}", text, ids, p) for i, ((text, ids), p) in
                enumerate(zip(prompts, params))]
        total = len(prompts) * n
        sent_tokens = [0] * total
        text_offset = [0] * total
        done = [False] * total
        echoed = [not request.echo] * total
        created = None
        merged = merge_async_iterators(gens)
        try:
            async for pi, state in merged:
                for seq in state.sequences:
                    idx = pi * n + seq.index
                    if done[idx]:
                        continue
                    finished = seq.finish_reason is not None
                    delta = seq.detokenizer.get_delta(finished) if seq.detokenizer is not None else ""
                    start = sent_tokens[idx]
                    new_ids = seq.token_ids[start:]
                    new_lps = seq.logprobs[start:start + len(new_ids)] if seq.logprobs is not None else None
                    if request.echo_only:  # the internally generated token is dropped
                        delta, new_ids, new_lps = "", [], [] if new_lps is not None else None
                    lp_ids = new_ids
                    if not echoed[idx]:
                        text, ids = prompts[pi]
                        delta = self._prompt_text(text, ids) + delta
                        echoed[idx] = True
                        if new_lps is not None:
                            lp_ids, new_lps = _echoed(request, ids, state.prompt_logprobs, new_ids, new_lps)
                    lps = None
                    if request.logprobs is not None and new_lps is not None:
                        lps = completion_logprobs(self.tokenizer, lp_ids, new_lps, request.logprobs, text_offset[idx])
                    sent_tokens[idx] += len(new_ids)
                    if not delta and not finished and not new_ids:  # a token without text still streams (vLLM)
                        continue
                    text_offset[idx] += len(delta)
                    chunk = CompletionStreamResponse(
                        id=request_id, model=self.model_name, created=created or _now(),
                        choices=[CompletionResponseChoice(
                            index=idx, text=delta, logprobs=lps, finish_reason=seq.finish_reason if finished else None,
                            stop_reason=seq.stop_reason if finished else None)])
                    created = chunk.created
                    if finished:
                        done[idx] = True
                    yield sse(chunk)
            if request.stream_options is not None and request.stream_options.include_usage:
                prompt_tokens = sum(len(ids) for _, ids in prompts)
                completion_tokens = sum(sent_tokens)
                yield sse(CompletionStreamResponse(id=request_id, model=self.model_name, choices=[],
                                                   usage=UsageInfo(prompt_tokens=prompt_tokens,
                                                                   completion_tokens=completion_tokens,
                                                                   total_tokens=prompt_tokens + completion_tokens)))
            yield SSE_DONE
        finally:
            await merged.aclose()


def _echoed(request: CompletionRequest, prompt_ids: list[int], prompt_logprobs: list | None, gen_ids: list[int],
            gen_logprobs: list) -> tuple[list[int], list]:
    """Token ids and logprob dicts a choice reports: with echo, the prompt's first (vLLM's shape, from
    SamplingParams.prompt_logprobs: None for its first token), then the generated ones."""
    if not request.echo:
        return gen_ids, gen_logprobs
    if prompt_logprobs is None or len(prompt_logprobs) != len(prompt_ids):
        raise RuntimeError("echo with logprobs: the engine returned no prompt logprobs")
    return [*prompt_ids, *gen_ids], [*prompt_logprobs, *gen_logprobs[:len(gen_ids)]]


def _now() -> int:
    import time
    return int(time.time())
