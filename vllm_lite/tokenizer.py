"""Tokenizer loading and chat templating (thin layer over transformers' tokenizers).

transformers is imported when a tokenizer is loaded, not with this module: the API server imports it (through the
chat serving code) whether or not it will ever need a tokenizer (--skip-tokenizer-init).
"""
from __future__ import annotations

import json
from typing import Any


def import_tokenizer_classes() -> None:
    """Import what `load_tokenizer` needs (seconds on a slow disk): the server runs this in a thread ahead of time."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: F401


def load_tokenizer(info: Any) -> Any:
    """info: anything with a `tokenizer` path or repo id (a ModelInfo or the API server's ModelDescription)."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(info.tokenizer)


def render_chat_template(tokenizer: Any, messages: list[dict[str, Any]], chat_template: str | None = None,
                         add_generation_prompt: bool = True, tools: list[dict[str, Any]] | None = None) -> str:
    """The conversation as the model's template writes it; `tools`: OpenAI tool definitions, for templates that
    describe them to the model."""
    if chat_template is None and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat template; pass chat_template=...")
    return tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt, tools=tools)


def apply_chat_template(tokenizer: Any, messages: list[dict[str, Any]], chat_template: str | None = None,
                        add_generation_prompt: bool = True, tools: list[dict[str, Any]] | None = None) -> list[int]:
    """Render the conversation and tokenize it (the template holds the special tokens)."""
    text = render_chat_template(tokenizer, messages, chat_template, add_generation_prompt, tools)
    return tokenizer(text, add_special_tokens=False).input_ids


_NON_REMOVING_PRE_TOKENIZERS = {"ByteLevel", "Digits", "Punctuation", "Split"}


def max_token_bytes(tokenizer: Any) -> int | None:
    """The most input bytes one token can stand for, where the tokenizer makes that provable, else None: a
    byte-level BPE (each character of a token is one input byte; added tokens match their own text) with no
    normalizer, no pre-tokenizer that drops text, no fused unknown tokens and no added token that swallows the
    whitespace beside it (lstrip / rstrip: any run of it). A text of B bytes then has at least
    ceil(B / this) tokens, so the server refuses a prompt far over the context window without tokenizing it:
    tokenizing megabytes holds the GIL for a few tenths of a second (the Rust encoding is built into Python lists
    and freed), which stalls the event loop and /health."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.normalizer is not None or backend.pre_tokenizer is None:
        return None
    model = backend.model
    if type(model).__name__ != "BPE" or (model.unk_token is not None and model.fuse_unk):
        return None
    if any(t.lstrip or t.rstrip for t in backend.get_added_tokens_decoder().values()):
        return None
    state = json.loads(backend.pre_tokenizer.__getstate__())
    parts = state.get("pretokenizers", []) if state.get("type") == "Sequence" else [state]
    types = [p.get("type") for p in parts]
    if "ByteLevel" not in types or any(t not in _NON_REMOVING_PRE_TOKENIZERS for t in types) or any(
            p.get("behavior") == "Removed" for p in parts):
        return None
    return max(len(t.encode("utf-8", "surrogatepass")) for t in backend.get_vocab(with_added_tokens=True))


def min_token_count(text: str, token_bytes: int | None) -> int:
    """A lower bound on the number of tokens of `text` (0 when `token_bytes`, from `max_token_bytes`, is None)."""
    if not token_bytes:
        return 0
    return -(-len(text.encode("utf-8", "surrogatepass")) // token_bytes)
