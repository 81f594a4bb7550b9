"""Structured outputs: constraints (JSON schema, JSON object, regex, choice, EBNF) compiled by xgrammar.

`validate` is light (no tokenizer, no compile) so the API server can refuse a bad constraint before admission;
the engine core's `StructuredOutputManager` compiles grammars in a thread pool, owns the matchers and fills each
step's packed bitmask.
"""
