"""Tokenizer loading and chat templating (thin layer over transformers' tokenizers)."""
from __future__ import annotations

from typing import Any

from transformers import AutoTokenizer


def load_tokenizer(info: Any) -> Any:
    return AutoTokenizer.from_pretrained(info.tokenizer)


def apply_chat_template(tokenizer: Any, messages: list[dict[str, Any]], chat_template: str | None = None,
                        add_generation_prompt: bool = True) -> list[int]:
    """Render the conversation with the model's template and tokenize it (the template holds special tokens)."""
    if chat_template is None and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat template; pass chat_template=...")
    text = tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False).input_ids
