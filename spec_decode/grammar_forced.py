"""Grammar-forced drafts (method "grammar", SGLang's jump-forward decoding as speculation): a constrained request's
drafts are the text its grammar forces next, tokenized.

Where a JSON schema leaves one way on (a required key's name and quotes, the colon after it, a const, the rest of an
enum value once it is unambiguous), xgrammar's `find_jump_forward_string()` names that text. Its tokens are proposed
as drafts and verified like any other: under the grammar's masks (a row per draft), by the target model, so the output
is exactly that of masked decoding: a draft is accepted only where the model, masked, picks that very token. A text
tokenized on its own may split where the model would not (a key's quote merged with its first letters); such a draft
is rejected and costs its row. Requests without a grammar get no drafts.

It pays where forced runs are long: compact JSON (`disable_any_whitespace`). Along the default model's own greedy
json_schema answers (bench/tools/grammar_forced_replay.py), drafting with every token known would save 34 % of the steps
at k = 4 with compact grammars and 13 % with the default any-whitespace ones (whitespace may follow `{`, `,` and `:`,
so little is forced). In the engine a request running ahead is only probed for drafts on its known tokens (one behind
the token in flight, spec_decode/adaptive.py), which a short forced run does not survive: on the CPU, one request at a
time, 28.6 % fewer forward steps compact and 1.9 % with any whitespace (docs/PERF.md).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

from vllm_lite.request import Request

_CACHED_TEXTS = 4096  # a schema's forced texts repeat in every answer (keys, separators)
_MAX_CHARS = 512  # of a forced text that is tokenized (a long const): far more than MAX_SPEC_TOKENS tokens need


class GrammarForcedProposer:
    """Engine-core proposer for method "grammar". structured: the engine's StructuredOutputManager (its tokenizer is
    loaded with its grammar compiler, before any request has a grammar)."""

    def __init__(self, structured: Any) -> None:
        self.structured = structured
        self._ids: OrderedDict[str, list[int]] = OrderedDict()

    def propose(self, request: Request, max_tokens: int) -> list[int]:
        grammar = request.grammar
        if grammar is None or max_tokens <= 0:
            return []
        text = grammar.forced_text()
        if not text:
            return []
        return self._tokens(text)[:max_tokens]

    def _tokens(self, text: str) -> list[int]:
        """The text's tokens; of a long text, those of its first _MAX_CHARS characters but the last (the cut may
        split it), which keeps the cache's memory bounded."""
        cut = len(text) > _MAX_CHARS
        text = text[:_MAX_CHARS]
        ids = self._ids.get(text)
        if ids is None:
            ids = list(self.structured.tokenizer.encode(text, add_special_tokens=False))
            ids = self._ids[text] = ids[:-1] if cut else ids
            if len(self._ids) > _CACHED_TEXTS:
                self._ids.popitem(last=False)
        return ids
