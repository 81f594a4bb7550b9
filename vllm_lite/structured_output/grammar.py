"""One request's grammar: an xgrammar matcher over the request's output tokens.

The scheduler advances it with the tokens each step produced (`accept_tokens`); the engine core fills the request's
bitmask rows from it (`fill_rows`: one row, or 1 + k rows when k drafts are verified, walking the matcher through
the drafts and rolling back) and cuts drafts the grammar refuses before they are scheduled (`valid_prefix`).

A single token sampled under this grammar's own mask (`masked`, set by the manager when it fills the row) cannot be
refused, so `accept_tokens` only records it (`pending`) and appends the grammar to the manager's sink: the manager
advances every such matcher in one GIL-free xgrammar call, on its fill thread beside the caller's Python work. Any
other use of the matcher here applies the pending token first (`flush`). Whether the grammar terminated is known at
once: a stop token is allowed by the mask only where the grammar may end, and taking it ends it. A deferred token the
matcher refuses (a mask that was not the grammar's: an engine defect) makes it take nothing more, so the request's
next tokens end it with an error in the scheduler.
"""
from __future__ import annotations

import functools
import json
from typing import Any

from vllm_lite.sampling_params import StructuredOutputsParams
from vllm_lite.structured_output.validate import CACHED_SPEC_CHARS, choice_ebnf, load_schema, prepare_schema

CompileKey = tuple[str, str, bool]


def compile_key(params: StructuredOutputsParams, disable_any_whitespace: bool,
                disable_additional_properties: bool) -> CompileKey:
    """What identifies a compiled grammar: (kind, canonical spec text, any_whitespace). The engine-wide config
    defaults are OR-ed with the request's own flags."""
    kind = params.kind
    any_whitespace = not (params.disable_any_whitespace or disable_any_whitespace)
    if kind == "json":
        close = params.disable_additional_properties or disable_additional_properties
        spec = params.json
        text = spec if isinstance(spec, str) else json.dumps(spec, ensure_ascii=False)  # key order: the output's
        prepared = _prepared_schema_text if len(text) <= CACHED_SPEC_CHARS else _prepared_schema_text.__wrapped__
        return kind, prepared(text, close), any_whitespace
    if kind == "json_object":
        return "json", '{"type": "object"}', any_whitespace
    if kind == "choice":
        return "grammar", choice_ebnf(params.choice), any_whitespace
    return kind, params.regex if kind == "regex" else params.grammar, any_whitespace


@functools.lru_cache(maxsize=1024)
def _prepared_schema_text(text: str, close_objects: bool) -> str:
    """The canonical text of a (validated) schema's JSON as xgrammar compiles it; a batch repeats a few schemas."""
    return json.dumps(prepare_schema(load_schema(json.loads(text)), close_objects=close_objects), ensure_ascii=False)


def compile_grammar(compiler: Any, key: CompileKey) -> Any:
    """Compile a key with an xgrammar GrammarCompiler (its own cache makes a repeated key cheap)."""
    kind, text, any_whitespace = key
    if kind == "json":  # without any_whitespace: compact, as vLLM documents disable_any_whitespace
        return compiler.compile_json_schema(text, any_whitespace=any_whitespace,
                                            separators=None if any_whitespace else (",", ":"))
    if kind == "regex":
        return compiler.compile_regex(text)
    return compiler.compile_grammar(text)


@functools.cache
def native_batch_api() -> Any | None:
    """xgrammar's native BatchGrammarMatcher class, whose batch calls take matcher handles (`Grammar.handle`); None
    where it lacks them (the Python wrappers then take the matchers). The wrappers rebuild the handle list through a
    Python property per matcher on every call (~0.1 ms per step at 256 requests with the GIL held), and the batch
    accept's wrapper converts its result item by item."""
    import xgrammar as xgr

    native = getattr(getattr(getattr(xgr, "base", None), "_core", None), "BatchGrammarMatcher", None)
    if native is None or not all(hasattr(native, f) for f in ("batch_accept_token", "batch_fill_next_token_bitmask")):
        return None
    return native


class Grammar:
    """A request's matcher (xgrammar GrammarMatcher) and how many of the request's output tokens it has taken."""

    def __init__(self, matcher: Any, stop_token_ids: frozenset[int] | None = None,
                 sink: list["Grammar"] | None = None) -> None:
        """stop_token_ids: the tokens whose acceptance terminates the matcher (xgrammar's tokenizer info); known,
        they spare a call into the matcher after every accepted token (~0.2 ms per step at 256 requests).
        None: the matcher is asked after every token. sink: where a grammar with a deferred token is listed
        (the manager's; None: tokens are always taken at once)."""
        self.matcher = matcher
        # What the manager's batch calls take: the native matcher (see native_batch_api), else the matcher itself.
        self.handle = matcher._handle if native_batch_api() is not None and hasattr(matcher, "_handle") else matcher
        self.num_accepted = 0
        self._stop = stop_token_ids
        self.is_terminated = False  # the matcher took a stop token (known before a deferred one is taken)
        self._sink = sink if stop_token_ids is not None else None
        self.masked = False  # the manager filled this grammar's one row for the step whose token comes next
        self.pending = -1  # a deferred token (-1: none), taken by the manager or by flush()
        self.refused = False  # a deferred token was refused (an engine defect): nothing is taken any more

    def accept_tokens(self, token_ids: list[int]) -> int:
        """Advance over `token_ids` in order; returns how many were taken (it stops after the token that terminates
        the grammar, and before a token it refuses). One token sampled under this grammar's mask is deferred."""
        masked, self.masked = self.masked, False
        if (masked and len(token_ids) == 1 and self._sink is not None and self.pending < 0 and not self.is_terminated
                and not self.refused):
            tok = token_ids[0]
            self.pending = tok
            self._sink.append(self)
            self.is_terminated = tok in self._stop
            self.num_accepted += 1
            return 1
        n = self._walk(token_ids)
        self.num_accepted += n
        return n

    def flush(self) -> None:
        """Take the deferred token now (the manager's batch call does it for many grammars at once)."""
        tok, self.pending = self.pending, -1
        if tok >= 0 and not self.matcher.accept_token(tok):
            self.refused = True

    def forced_text(self) -> str:
        """The text the grammar forces next, whatever is sampled ("" where the next token is a choice, or the grammar
        has ended): the grammar-forced proposer's drafts."""
        if self.pending >= 0:
            self.flush()
        if self.is_terminated or self.refused:
            return ""
        return self.matcher.find_jump_forward_string()

    def valid_prefix(self, drafts: list[int]) -> int:
        """How many leading draft tokens the grammar accepts (the matcher is left unchanged)."""
        n = self._walk(drafts)
        if n:
            self.matcher.rollback(n)
            self.is_terminated = False  # it was not before the walk (a terminated matcher takes nothing)
        return n

    def _walk(self, token_ids: list[int]) -> int:
        """Accept tokens in order until one is refused or the matcher terminates (after its stop token)."""
        if self.pending >= 0:
            self.flush()
        if self.is_terminated or self.refused:  # refused: the scheduler ends the request with an error
            return 0
        matcher = self.matcher
        stop = self._stop
        for i, tok in enumerate(token_ids):
            if not matcher.accept_token(tok):
                self.is_terminated = matcher.is_terminated()  # only a stop token terminates; asked to be sure
                return i
            if stop is None or tok in stop:
                self.is_terminated = matcher.is_terminated()
                if self.is_terminated:
                    return i + 1
        return len(token_ids)

    def fill_rows(self, bitmask: Any, row: int, drafts: list[int] | None) -> None:
        """Fill bitmask rows row .. row + len(drafts): the mask now, then after each draft token (the matcher walks
        the drafts and rolls back). Rows past a draft the grammar refuses repeat the last mask (verification
        rejects that draft, so they are never sampled)."""
        if self.pending >= 0:
            self.flush()
        matcher = self.matcher
        if self.is_terminated:  # a request the async pipeline scheduled once more after its last token
            bitmask[row: row + 1 + len(drafts or ())] = -1
            return
        matcher.fill_next_token_bitmask(bitmask, row)
        if not drafts:
            return
        taken = 0
        for i, tok in enumerate(drafts):
            if taken == i and not matcher.is_terminated() and matcher.accept_token(tok):
                taken += 1
                if matcher.is_terminated():
                    bitmask[row + i + 1] = -1  # past the end: the draft row's token is discarded
                else:
                    matcher.fill_next_token_bitmask(bitmask, row + i + 1)
            else:
                bitmask[row + i + 1] = bitmask[row + i]
        if taken:
            matcher.rollback(taken)
