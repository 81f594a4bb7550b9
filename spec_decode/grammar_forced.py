"""Grammar-forced drafts (method "grammar", SGLang's jump-forward decoding as speculation): a constrained request's
drafts are the text its grammar forces next, tokenized; where nothing is forced, and for requests without a grammar,
n-gram prompt lookup (spec_decode/ngram.py) drafts instead.

Where a JSON schema leaves one way on (a required key's name and quotes, the colon after it, a const, the rest of an
enum value once it is unambiguous), xgrammar's `find_jump_forward_string()` names that text. Its tokens are proposed
as drafts and verified like any other: under the grammar's masks (a row per draft), by the target model, so the output
is exactly that of masked decoding: a draft is accepted only where the model, masked, picks that very token. A text
tokenized on its own may split where the model would not (a key's quote merged with its first letters); such a draft
is rejected and costs its row.

The two complement each other on JSON: the forced text covers keys and separators of compact output, n-grams the
formatting and keys a model repeats (`",\n  "`). The default model on the CPU, 12 json_schema requests one at a time,
k = 4 (docs/PERF.md): forward steps -47 % with compact grammars and -38 % with the default any-whitespace ones,
against -26 % / -37 % for n-gram lookup alone (1..4) and -29 % / -2 % for the forced text alone. Short n-grams suit
JSON (its separators are 1-3 tokens), so this method looks up 1..4 tokens unless told otherwise.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

from vllm_lite.request import Request

_CACHED_TEXTS = 4096  # a schema's forced texts repeat in every answer (keys, separators)
_MAX_CHARS = 512  # of a forced text that is tokenized (a long const): far more than MAX_SPEC_TOKENS tokens need


class GrammarForcedProposer:
    """Engine-core proposer for method "grammar". structured: the engine's StructuredOutputManager (its tokenizer is
    loaded with its grammar compiler, before any request has a grammar); fallback: the proposer where nothing is
    forced (n-gram lookup)."""

    def __init__(self, structured: Any, fallback: Any) -> None:
        self.structured = structured
        self.fallback = fallback
        self._ids: OrderedDict[str, list[int]] = OrderedDict()

    def propose(self, request: Request, max_tokens: int) -> list[int]:
        if max_tokens <= 0:
            return []
        text = request.grammar.forced_text() if request.grammar is not None else ""
        if not text:
            return self.fallback.propose(request, max_tokens)
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
