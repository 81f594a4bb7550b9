"""Prompt checks shared by the offline `LLM` and the OpenAI server: one definition, so both refuse the same prompts
with the same message (the LLM raises the ValueError; the server turns it into a 400 with OpenAI's error JSON).

Both sides pass the resolved model's numbers (ModelInfo on the LLM side, the ModelDescription the engine sends on
the server side: the same `max_model_len` and `vocab_size` fields). Imports nothing from the engine or workers."""
from __future__ import annotations

from typing import Sequence


def check_token_ids(ids: Sequence[int], vocab_size: int) -> None:
    """ValueError naming the first id outside [0, vocab_size)."""
    if ids and (min(ids) < 0 or max(ids) >= vocab_size):  # min/max scan in C; the loop only names the bad id
        bad = next(t for t in ids if not 0 <= t < vocab_size)
        raise ValueError(f"token id {bad} is out of the vocabulary (size {vocab_size})")


def validate_prompt(ids: Sequence[int], max_model_len: int, vocab_size: int) -> None:
    """ValueError unless the prompt is non-empty, at most `max_model_len` tokens and every id is in [0, vocab_size)."""
    n = len(ids)
    if n == 0:
        raise ValueError("the prompt is empty")
    if n > max_model_len:
        raise ValueError(f"the prompt has {n} tokens, more than the model's maximum context length of "
                         f"{max_model_len} tokens (max_model_len)")
    check_token_ids(ids, vocab_size)
