"""OpenAI-compatible request/response models (pydantic 2), with the fields vLLM accepts on top of OpenAI's.

Requests turn into `SamplingParams` through `to_sampling_params(default_max_tokens)`; range checks live in
SamplingParams.validate (ValueError naming the field), so the server and the offline API agree on them.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from vllm_lite.entrypoints.openai.structured_request import logit_bias_of, structured_outputs_of
from vllm_lite.entrypoints.openai.tools import template_tool_calls
from vllm_lite.sampling_params import SamplingParams, StructuredOutputsParams, invalid_unicode

MAX_LOGPROBS = 20


def random_uuid() -> str:
    return uuid.uuid4().hex


class OpenAIBaseModel(BaseModel):
    # Unknown fields are accepted and ignored, as vLLM does.
    model_config = ConfigDict(extra="allow")


def _find_invalid_text(obj: Any, path: str) -> str | None:
    """The first string inside `obj` (models, lists, dicts) that is not valid Unicode, as "path is invalid: why"."""
    if isinstance(obj, str):
        why = invalid_unicode(obj)
        return f"{path} is invalid: {why}" if why else None
    if isinstance(obj, BaseModel):
        items = [*obj.__dict__.items(), *(obj.__pydantic_extra__ or {}).items()]
        return next((m for k, v in items if (m := _find_invalid_text(v, f"{path}.{k}" if path else k))), None)
    if isinstance(obj, dict):
        return next((m for k, v in obj.items() if (m := _find_invalid_text(k, path) or
                                                    _find_invalid_text(v, f"{path}.{k}"))), None)
    if isinstance(obj, list) and obj and not isinstance(obj[0], int):  # token-id lists hold no text
        return next((m for i, v in enumerate(obj) if (m := _find_invalid_text(v, f"{path}[{i}]"))), None)
    return None


class TextCheckedRequest(OpenAIBaseModel):
    """A request whose every string must be valid Unicode: a JSON escape such as "\\ud800" (a lone surrogate)
    parses, but the tokenizer and the chat template cannot take it; refused as a 400 naming the field."""

    @model_validator(mode="after")
    def _valid_unicode(self) -> "TextCheckedRequest":
        why = _find_invalid_text(self, "")
        if why:
            raise ValueError(why)
        return self


class ErrorInfo(OpenAIBaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(OpenAIBaseModel):
    error: ErrorInfo


class StreamOptions(OpenAIBaseModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int = 0
    completion_tokens: int | None = 0
    total_tokens: int = 0


class _SamplingFields(TextCheckedRequest):
    """Fields shared by completions and chat completions (OpenAI's plus vLLM's extra sampling parameters)."""
    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    user: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None
    logit_bias: dict[str, Any] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None

    def _requested_max_tokens(self) -> int | None:
        raise NotImplementedError

    def _num_logprobs(self) -> int | None:
        raise NotImplementedError

    def check(self) -> None:
        """Request-level checks beyond SamplingParams' ranges (ValueError naming the field)."""
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream=true")
        if (self.__pydantic_extra__ or {}).get("prompt_logprobs") is not None:
            # vLLM's separate per-choice prompt_logprobs response field is not built; refuse rather than ignore it.
            raise ValueError("prompt_logprobs is not supported by this server; on /v1/completions use echo=true "
                             "with logprobs=N to get the prompt tokens' logprobs")
        max_tokens = self._requested_max_tokens()
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens!r} is invalid: it must be at least 1")

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        """The output constraint from response_format, structured_outputs or guided_* (one of them at most)."""
        guided = {name: getattr(self, name) for name in ("guided_json", "guided_regex", "guided_choice",
                                                          "guided_grammar", "guided_whitespace_pattern")}
        return structured_outputs_of(self.response_format, self.structured_outputs, guided)

    def to_sampling_params(self, default_max_tokens: int,
                           structured: StructuredOutputsParams | None = None) -> SamplingParams:
        """`default_max_tokens`: what remains of the context window after the prompt (the cap for max_tokens);
        `structured`: the output constraint (structured_outputs_params(), or a tool-call schema)."""
        requested = self._requested_max_tokens()
        max_tokens = default_max_tokens if requested is None else min(requested, default_max_tokens)
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        kwargs: dict[str, Any] = dict(
            n=self.n, seed=self.seed, max_tokens=max_tokens, min_tokens=self.min_tokens, stop=stop or None,
            stop_token_ids=list(self.stop_token_ids) if self.stop_token_ids else None, ignore_eos=self.ignore_eos,
            logprobs=self._num_logprobs(), skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output, structured_outputs=structured,
            logit_bias=logit_bias_of(self.logit_bias), allowed_token_ids=self.allowed_token_ids,
            bad_words=self.bad_words)
        for name, default in (("temperature", 1.0), ("top_p", 1.0), ("top_k", 0), ("min_p", 0.0),
                              ("presence_penalty", 0.0), ("frequency_penalty", 0.0), ("repetition_penalty", 1.0)):
            value = getattr(self, name)
            kwargs[name] = default if value is None else value
        if kwargs["min_tokens"] > max_tokens:
            raise ValueError(f"min_tokens={self.min_tokens} is invalid: it must be less than or equal to "
                             f"max_tokens ({max_tokens})")
        return SamplingParams(**kwargs)  # __post_init__ validates and raises ValueError naming the field


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's and vLLM's default for /v1/completions
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    add_special_tokens: bool = True

    @property
    def echo_only(self) -> bool:
        """echo=true with max_tokens=0: only the prompt comes back (with its logprobs; lm-eval's loglikelihood).
        One token is still generated internally, as in vLLM, and dropped."""
        return self.echo and self.max_tokens == 0

    def _requested_max_tokens(self) -> int | None:
        return 1 if self.echo_only else self.max_tokens

    def _num_logprobs(self) -> int | None:
        return self.logprobs

    def to_sampling_params(self, *args: Any, **kwargs: Any) -> SamplingParams:
        params = super().to_sampling_params(*args, **kwargs)
        if self.echo and self.logprobs is not None:
            params.prompt_logprobs = self.logprobs  # the echoed prompt tokens carry logprobs too (vLLM)
        return params

    def check(self) -> None:
        super().check()
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs={self.logprobs} is invalid: it must be in [0, {MAX_LOGPROBS}]")
        if self.suffix:
            raise ValueError("suffix is not supported")

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list of strings or token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ValueError("prompt is invalid: it must not be empty")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class ChatMessage(OpenAIBaseModel):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None  # assistant messages: the calls it made (checked in conversation())
    tool_call_id: str | None = None  # tool messages: the call they answer


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Any] | None = None  # checked by tools.plan_tools (a malformed definition is a 400)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    def _requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def _num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def check(self) -> None:
        super().check()
        if self.top_logprobs is not None:
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise ValueError(f"top_logprobs={self.top_logprobs} is invalid: it must be in [0, {MAX_LOGPROBS}]")
            if self.top_logprobs > 0 and not self.logprobs:
                raise ValueError("top_logprobs is invalid: when using top_logprobs, logprobs must be set to true")
        if not self.messages:
            raise ValueError("messages is invalid: it must contain at least one message")
        for i, m in enumerate(self.messages):
            if m.role not in ("system", "user", "assistant", "developer", "tool"):
                raise ValueError(f"messages[{i}].role={m.role!r} is invalid")

    def conversation(self) -> list[dict[str, Any]]:
        """Messages as plain dicts for the chat template; a list of text parts is joined with newlines."""
        out = []
        for i, m in enumerate(self.messages):
            content = m.content
            if isinstance(content, list):
                texts = []
                for part in content:
                    if part.get("type", "text") != "text":
                        raise ValueError(f"messages[{i}].content: part type {part.get('type')!r} is not supported "
                                         "(only 'text')")
                    texts.append(str(part.get("text", "")))
                content = "\n".join(texts)
            msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content or ""}
            if m.name:
                msg["name"] = m.name
            if m.tool_calls is not None:
                msg["tool_calls"] = template_tool_calls(m.tool_calls, f"messages[{i}]")
            if m.tool_call_id is not None:
                msg["tool_call_id"] = m.tool_call_id
            out.append(msg)
        return out


# ---- responses ---------------------------------------------------------------------------------------------------

class CompletionLogProbs(OpenAIBaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionResponseChoice(OpenAIBaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo | None = None


class CompletionStreamResponse(CompletionResponse):
    pass


class ChatTopLogprob(OpenAIBaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobToken(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(OpenAIBaseModel):
    content: list[ChatLogprobToken] | None = None


class FunctionCall(OpenAIBaseModel):
    name: str
    arguments: str  # a JSON object as text, as OpenAI sends it


class ToolCall(OpenAIBaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaFunctionCall(OpenAIBaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(OpenAIBaseModel):
    """A streamed piece of tool call `index`: the first carries id, type and name; later ones more arguments."""
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


class ChatResponseMessage(OpenAIBaseModel):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatCompletionResponseChoice(OpenAIBaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo


class DeltaMessage(OpenAIBaseModel):
    role: str | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="wrap")
    def _without_absent_tool_calls(self, handler: Any) -> dict[str, Any]:
        """Plain text chunks stay as they were (no "tool_calls": null in every chunk)."""
        data = handler(self)
        if data.get("tool_calls") is None:
            data.pop("tool_calls", None)
        return data


class ChatCompletionStreamChoice(OpenAIBaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionStreamResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None


class TokenizeRequest(TextCheckedRequest):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    chat_template: str | None = None


class DetokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    tokens: list[int]
