"""Per-request sampling parameters, mirroring vLLM's SamplingParams (a msgspec Struct so it can cross sockets)."""
from __future__ import annotations

import math
from typing import Any

import msgspec

_GREEDY_EPS = 1e-5
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for logit_bias values
MAX_TEMPERATURE = 100.0  # above this sampling is indistinguishable from uniform; 1e6 or inf is a client bug
_INT64_MIN, _INT64_MAX = -2 ** 63, 2 ** 63 - 1  # what crosses the sockets (msgspec) and seeds torch generators
_INT_FIELDS = ("n", "top_k", "seed", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs")
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


def _int64(value: object) -> bool:
    return value is None or (isinstance(value, int) and _INT64_MIN <= value <= _INT64_MAX)


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def invalid_unicode(text: str) -> str | None:
    """Why `text` cannot be encoded as UTF-8 (a lone surrogate such as "\\ud800"), or None when it can."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (f"it contains a lone surrogate {text[exc.start]!r} at position {exc.start}, which is not valid "
                "Unicode")
    return None


_CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object")


class StructuredOutputsParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A constraint on the output (vLLM's StructuredOutputsParams): exactly one of `json` (a JSON schema, as a dict
    or a JSON string), `regex`, `choice` (the output is one of these strings), `grammar` (EBNF, xgrammar's dialect,
    root rule `root`) or `json_object=True` (any JSON object). The engine compiles it with xgrammar and masks every
    step's logits; syntax and unsupported features are checked by vllm_lite.structured_output.validate."""
    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False
    # JSON without whitespace between tokens (xgrammar's any_whitespace=False): shorter outputs, and small models
    # cannot wander off into endless whitespace.
    disable_any_whitespace: bool = False
    # Objects in `json` that do not say otherwise get additionalProperties: false.
    disable_additional_properties: bool = False
    # vLLM's field for the outlines/guidance backends; xgrammar cannot honour it, so setting it is refused.
    whitespace_pattern: str | None = None

    def __post_init__(self) -> None:
        given = [name for name in _CONSTRAINTS if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                "structured_outputs needs exactly one kind of constraint (json, regex, choice, grammar or "
                f"json_object), got {'none' if not given else ', '.join(given)}")

    @property
    def kind(self) -> str:
        """Which constraint is set: "json", "regex", "choice", "grammar" or "json_object"."""
        return next(name for name in _CONSTRAINTS if getattr(self, name) not in (None, False))


class SamplingParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutputsParams | None = None
    # token id -> bias added to its logit before sampling (OpenAI's logit_bias), in [-MAX_LOGIT_BIAS, MAX_LOGIT_BIAS]
    logit_bias: dict[int, float] | None = None
    # only these token ids may be sampled (vLLM's allowed_token_ids)
    allowed_token_ids: list[int] | None = None
    # words never generated: each word's last token is banned when the tokens before it were just generated
    bad_words: list[str] | None = None
    # bad_words as token sequences, filled by the front end that holds the tokenizer (resolve_bad_words)
    bad_words_token_ids: list[list[int]] | None = None
    # logprob of every prompt token after the first, plus the top-N at each prompt position (vLLM's field;
    # RequestOutput.prompt_logprobs); such requests skip prefix-cache hits (the skipped rows have no logits)
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.top_k is None or self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field for any out-of-range value (the server turns it into a 400)."""
        for name in _INT_FIELDS:
            if not _int64(getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: it must be an integer in "
                                 f"[-2**63, 2**63 - 1]")
        for name in _FLOAT_FIELDS:
            if not _finite(getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: it must be a finite number")
        for tid in self.stop_token_ids or ():
            if not (isinstance(tid, int) and 0 <= tid <= _INT64_MAX):
                raise ValueError(f"stop_token_ids is invalid: {tid!r} is not a token id (an integer >= 0)")
        for text in self.stop or ():
            if not isinstance(text, str) or not text:
                raise ValueError(f"stop is invalid: {text!r}: stop strings must be non-empty strings")
            why = invalid_unicode(text)
            if why:
                raise ValueError(f"stop is invalid: {why}")
        self._validate_token_constraints()
        checks = [
            ("n", isinstance(self.n, int) and self.n >= 1, "must be an integer >= 1"),
            ("temperature", 0 <= self.temperature <= MAX_TEMPERATURE, f"must be in [0, {MAX_TEMPERATURE:g}]"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "must be -1, 0 (disabled) or a positive integer"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 1, "must be at least 1"),
            ("min_tokens", self.min_tokens >= 0, "must be >= 0"),
            ("min_tokens", self.max_tokens is None or self.min_tokens <= self.max_tokens,
             "must be less than or equal to max_tokens"),
            ("logprobs", self.logprobs is None or self.logprobs >= 0, "must be >= 0"),
            ("prompt_logprobs", self.prompt_logprobs is None or self.prompt_logprobs >= 0, "must be >= 0"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: it {why}")

    def _validate_token_constraints(self) -> None:
        """logit_bias / allowed_token_ids / bad_words shapes and ranges (the vocabulary is checked in check_vocab)."""
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError("logit_bias is invalid: it must map token ids to biases")
            for tid, bias in self.logit_bias.items():
                if not (isinstance(tid, int) and not isinstance(tid, bool) and 0 <= tid <= _INT64_MAX):
                    raise ValueError(f"logit_bias is invalid: key {tid!r} is not a token id (an integer >= 0)")
                if isinstance(bias, bool) or not _finite(bias) or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                    raise ValueError(f"logit_bias is invalid: the bias {bias!r} of token {tid} must be a number in "
                                     f"[-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")
        if self.allowed_token_ids is not None:
            if not self.allowed_token_ids:
                raise ValueError("allowed_token_ids is invalid: it must not be empty")
            for tid in self.allowed_token_ids:
                if not (isinstance(tid, int) and not isinstance(tid, bool) and 0 <= tid <= _INT64_MAX):
                    raise ValueError(f"allowed_token_ids is invalid: {tid!r} is not a token id (an integer >= 0)")
        for word in self.bad_words or ():
            if not isinstance(word, str) or not word.strip():
                raise ValueError(f"bad_words is invalid: {word!r}: bad words must be non-empty strings")
            why = invalid_unicode(word)
            if why:
                raise ValueError(f"bad_words is invalid: {why}")
        for seq in self.bad_words_token_ids or ():
            if not seq or not all(isinstance(t, int) and 0 <= t <= _INT64_MAX for t in seq):
                raise ValueError(f"bad_words_token_ids is invalid: {seq!r} is not a non-empty list of token ids")

    def check_vocab(self, vocab_size: int) -> None:
        """ValueError naming the field for a token id outside [0, vocab_size) (the front ends know the size)."""
        for name, ids in (("stop_token_ids", self.stop_token_ids), ("allowed_token_ids", self.allowed_token_ids),
                          ("logit_bias", list(self.logit_bias or ())),
                          ("bad_words", [t for seq in self.bad_words_token_ids or () for t in seq])):
            bad = [t for t in ids or () if not 0 <= t < vocab_size]
            if bad:
                raise ValueError(f"{name} is invalid: token id {bad[0]} is out of the vocabulary (size {vocab_size})")

    def resolve_bad_words(self, tokenizer: object) -> None:
        """Tokenize bad_words into bad_words_token_ids (as vLLM does: each word as written without leading spaces,
        and with one leading space when that tokenizes differently, since a word inside a text usually follows
        a space)."""
        if not self.bad_words or self.bad_words_token_ids is not None:
            return
        if tokenizer is None:
            raise ValueError("bad_words is invalid: it needs a tokenizer (this engine runs with skip_tokenizer_init)")
        seqs: list[list[int]] = []
        for word in self.bad_words:
            for text in (word.lstrip(), " " + word.lstrip()):
                ids = list(tokenizer.encode(text, add_special_tokens=False))  # type: ignore[attr-defined]
                if ids and ids not in seqs:
                    seqs.append(ids)
        self.bad_words_token_ids = seqs

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def has_multi_token_bad_words(self) -> bool:
        """Which tokens the bad words ban depends on the generated tokens (the worker needs their values, and
        verified draft rows would not see the drafts before them)."""
        return any(len(seq) > 1 for seq in self.bad_words_token_ids or ())

    @property
    def all_stop_token_ids(self) -> set[int]:
        return set(self.stop_token_ids or ())
