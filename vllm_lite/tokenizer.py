"""Tokenizer loading and chat templating (thin layer over transformers' tokenizers).

transformers is imported when a tokenizer is loaded, not with this module: the API server imports it (through the
chat serving code) whether or not it will ever need a tokenizer (--skip-tokenizer-init).
"""
from __future__ import annotations

from typing import Any


def import_tokenizer_classes() -> None:
    """Import what `load_tokenizer` needs (seconds on a slow disk): the server runs this in a thread ahead of time."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: F401


def load_tokenizer(info: Any) -> Any:
    """info: anything with a `tokenizer` path or repo id (a ModelInfo or the API server's ModelDescription)."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(info.tokenizer)


def apply_chat_template(tokenizer: Any, messages: list[dict[str, Any]], chat_template: str | None = None,
                        add_generation_prompt: bool = True, tools: list[dict[str, Any]] | None = None) -> list[int]:
    """Render the conversation with the model's template and tokenize it (the template holds special tokens);
    `tools`: OpenAI tool definitions, for templates that describe them to the model."""
    if chat_template is None and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat template; pass chat_template=...")
    text = tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt, tools=tools)
    return tokenizer(text, add_special_tokens=False).input_ids
