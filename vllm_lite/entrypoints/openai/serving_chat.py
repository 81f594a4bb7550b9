"""/v1/chat/completions: messages through the chat template, then the same engine plumbing as completions."""
from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from vllm_lite.entrypoints.openai.errors import APIError
from vllm_lite.entrypoints.openai.protocol import (ChatChoiceLogprobs, ChatCompletionRequest, ChatCompletionResponse,
                                                   ChatCompletionResponseChoice, ChatCompletionStreamChoice,
                                                   ChatCompletionStreamResponse, ChatLogprobToken,
                                                   ChatResponseMessage, ChatTopLogprob, DeltaMessage, UsageInfo,
                                                   random_uuid)
from vllm_lite.entrypoints.openai.serving_completions import (SSE_DONE, OpenAIServing, SSEResponse, _clamp,
                                                              sorted_top, sse, token_text)
from vllm_lite.entrypoints.openai.template_sandbox import TemplateRenderError, TemplateSandbox
from vllm_lite.entrypoints.openai.tool_parsers import parse_tool_calls, stream_parser
from vllm_lite.entrypoints.openai.tools import ToolPlan, plan_tools
from vllm_lite.sampling_params import StructuredOutputsParams
from vllm_lite.tokenizer import render_chat_template


def chat_logprobs(tokenizer: Any, token_ids: list[int], logprobs: list[dict], num: int) -> ChatChoiceLogprobs:
    content = []
    for token, d in zip(token_ids, logprobs):
        lp = d.get(token)
        text = token_text(tokenizer, token, lp)
        top = [ChatTopLogprob(token=(t := token_text(tokenizer, tid, tlp)), logprob=_clamp(tlp.logprob),
                              bytes=list(t.encode("utf-8", errors="replace"))) for tid, tlp in sorted_top(d, num)]
        content.append(ChatLogprobToken(token=text, logprob=_clamp(lp.logprob) if lp is not None else -9999.0,
                                        bytes=list(text.encode("utf-8", errors="replace")), top_logprobs=top))
    return ChatChoiceLogprobs(content=content)


def _finish_reason(reason: str | None, called: bool) -> str | None:
    """OpenAI's "tool_calls" for a choice that ended normally with calls ("length" etc. stay as they are)."""
    return "tool_calls" if called and reason == "stop" else reason


class OpenAIServingChat(OpenAIServing):

    def __init__(self, client: Any, served_model_names: list[str], metrics: Any | None = None,
                 chat_template: str | None = None, trust_request_chat_template: bool = False,
                 template_timeout_s: float = 5.0, tool_parser: str | None = None) -> None:
        """tool_parser: the parser of tool_choice "auto" (--tool-call-parser with --enable-auto-tool-choice);
        None refuses "auto" as vLLM does."""
        super().__init__(client, served_model_names, metrics)
        self.tool_parser = tool_parser
        self.chat_template = chat_template
        self.trust_request_chat_template = trust_request_chat_template
        # request-supplied templates render in killable child processes with a time limit (template_sandbox)
        self.sandbox = TemplateSandbox(template_timeout_s) if trust_request_chat_template else None

    def check_template(self, request: ChatCompletionRequest) -> None:
        if self.tokenizer is None:
            raise APIError("chat completions need a tokenizer", 400, "messages")
        if request.chat_template is not None and not self.trust_request_chat_template:
            raise APIError("chat_template is not allowed in requests: this server renders only its own chat template "
                           "(start it with --trust-request-chat-template to allow request-supplied ones)", 400,
                           "chat_template")

    async def render_async(self, request: ChatCompletionRequest) -> list[int]:
        """The prompt ids off the event loop: a request's own template in the sandbox (time-limited), then the
        tokenizer in a thread; the server's template renders and tokenizes in a thread (`render`)."""
        self.check_template(request)
        if request.chat_template is None:
            return await asyncio.to_thread(self.render, request)
        messages = [{k: v for k, v in m.items() if v is not None} for m in request.conversation()]
        try:
            variables = dict(self.tokenizer.special_tokens_map)
            if request.tools is not None:
                variables["tools"] = request.tools
            text = await self.sandbox.render(request.chat_template, messages, request.add_generation_prompt,
                                             variables)
        except TemplateRenderError as exc:
            raise APIError(f"chat_template: {exc}", 400, "chat_template") from None
        return await asyncio.to_thread(self.encode_rendered, text)

    def render(self, request: ChatCompletionRequest) -> list[int]:
        self.check_template(request)
        conversation = request.conversation()
        add_gen = request.add_generation_prompt
        try:
            text = render_chat_template(self.tokenizer, conversation, request.chat_template or self.chat_template,
                                        add_gen, tools=request.tools)
        except ValueError as exc:
            raise APIError(f"chat_template: {exc}", 400, "chat_template") from exc
        except Exception as exc:  # noqa: BLE001 - jinja errors in a user template
            raise APIError(f"chat_template: could not render the conversation: {exc}", 400, "chat_template") \
                from exc
        return self.encode_rendered(text)

    def encode_rendered(self, text: str) -> list[int]:
        """A rendered conversation's ids (its template wrote the special tokens); one far over the context window is
        refused by its size first (check_text_size)."""
        self.check_text_size(text, "messages")
        return self.tokenizer(text, add_special_tokens=False).input_ids

    async def create_chat_completion(self, request: ChatCompletionRequest, raw_request: Request) -> Response:
        async def build() -> Response:
            self.check_model(request.model)
            self.check_request(request)
            self.check_alive()
            plan = plan_tools(request.tools, request.tool_choice, self.tool_parser is not None,
                              request.parallel_tool_calls)
            structured = await asyncio.to_thread(self.structured_for, request, plan)
            ids = await self.render_async(request)  # templates and tokenizing stay off the loop
            self.check_alive()
            params = request.to_sampling_params(self.check_prompt(ids, request._requested_max_tokens(), "messages"),
                                                structured)
            self.check_params(params)
            request_id = f"chatcmpl-{random_uuid()}"
            if request.stream:
                return SSEResponse(self.stream_guard(self._stream(request, request_id, ids, params, plan)))
            return await self._full(request, request_id, ids, params, plan)
        return await self.handle(raw_request, build)

    def structured_for(self, request: ChatCompletionRequest, plan: ToolPlan) -> StructuredOutputsParams | None:
        """The output constraint: the request's own (response_format, structured_outputs, guided_*), or for
        tool_choice "required" / a named function the schema of the calls; both at once is refused."""
        structured = request.structured_outputs_params()
        if plan.schema is None:
            self.check_structured(structured)
            return structured
        if structured is not None:
            raise ValueError("tool_choice is invalid: 'required' or a named function already constrains the output; "
                             "it cannot be combined with response_format, structured_outputs or guided_*")
        structured = StructuredOutputsParams(json=plan.schema)
        try:
            self.check_structured(structured)
        except ValueError as exc:
            raise ValueError(f"tools is invalid: a function's parameters cannot constrain the output: {exc}") \
                from None
        return structured

    async def _full(self, request: ChatCompletionRequest, request_id: str, ids: list[int], params: Any,
                    plan: ToolPlan) -> Response:
        state = await self.collect(self.generate(request_id, None, ids, params))
        choices, completion_tokens = [], 0
        for seq in state.sequences:
            completion_tokens += len(seq.token_ids)
            lps = None
            if request.logprobs and seq.logprobs is not None:
                lps = chat_logprobs(self.tokenizer, seq.token_ids, seq.logprobs, request.top_logprobs or 0)
            content, calls = parse_tool_calls(plan.mode, seq.text, plan.name)
            message = ChatResponseMessage(content=content, tool_calls=calls or None)
            choices.append(ChatCompletionResponseChoice(index=seq.index, message=message, logprobs=lps,
                                                        finish_reason=_finish_reason(seq.finish_reason, bool(calls)),
                                                        stop_reason=seq.stop_reason))
        usage = UsageInfo(prompt_tokens=len(ids), completion_tokens=completion_tokens,
                          total_tokens=len(ids) + completion_tokens)
        resp = ChatCompletionResponse(id=request_id, model=self.model_name, choices=choices, usage=usage)
        return JSONResponse(resp.model_dump())

    async def _stream(self, request: ChatCompletionRequest, request_id: str, ids: list[int],
                      params: Any, plan: ToolPlan) -> AsyncIterator[str]:
        n = request.n
        created = int(time.time())
        include_usage = request.stream_options is not None and bool(request.stream_options.include_usage)

        def chunk(choices: list[ChatCompletionStreamChoice]) -> str:
            return sse(ChatCompletionStreamResponse(id=request_id, model=self.model_name, created=created,
                                                    choices=choices))

        gen = self.generate(request_id, None, ids, params)
        sent = [0] * n
        done = [False] * n
        parsers = [stream_parser(plan.mode, plan.name) for _ in range(n)]
        try:
            for i in range(n):
                yield chunk([ChatCompletionStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
            async for state in gen:
                for seq in state.sequences:
                    i = seq.index
                    if done[i]:
                        continue
                    finished = seq.finish_reason is not None
                    delta = seq.detokenizer.get_delta(finished) if seq.detokenizer is not None else ""
                    new_ids = seq.token_ids[sent[i]:]
                    lps = None
                    if request.logprobs and seq.logprobs is not None and new_ids:
                        lps = chat_logprobs(self.tokenizer, new_ids, seq.logprobs[sent[i]:sent[i] + len(new_ids)],
                                            request.top_logprobs or 0)
                    sent[i] += len(new_ids)
                    delta, calls = parsers[i].feed(delta)
                    if finished:
                        more, more_calls = parsers[i].finish()
                        delta, calls = delta + more, calls + more_calls
                    if not delta and not calls and not finished and lps is None:
                        continue
                    if finished:
                        done[i] = True
                    if calls:
                        message = DeltaMessage(content=delta or None, tool_calls=calls)
                    else:
                        message = DeltaMessage(content=delta) if delta or not finished else DeltaMessage()
                    reason = _finish_reason(seq.finish_reason, parsers[i].num_calls > 0) if finished else None
                    yield chunk([ChatCompletionStreamChoice(index=i, delta=message, logprobs=lps, finish_reason=reason,
                                                            stop_reason=seq.stop_reason if finished else None)])
            if include_usage:
                completion_tokens = sum(sent)
                yield sse(ChatCompletionStreamResponse(
                    id=request_id, model=self.model_name, created=created, choices=[],
                    usage=UsageInfo(prompt_tokens=len(ids), completion_tokens=completion_tokens,
                                    total_tokens=len(ids) + completion_tokens)))
            yield SSE_DONE
        finally:
            await gen.aclose()
