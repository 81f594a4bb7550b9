"""Which engine-core proposer a speculative config asks for."""
from __future__ import annotations

from typing import Any

from vllm_lite.config import SpeculativeConfig


def make_proposer(config: SpeculativeConfig, info: Any = None, structured: Any = None) -> Any | None:
    """The engine-core proposer for `config.method` ("ngram", "suffix", "grammar"); None without a method and for the
    model methods, whose drafter runs in the worker. `info` (the target's ModelInfo) is for proposers that need it;
    `structured` (the engine's StructuredOutputManager) for "grammar", which needs the tokenizer."""
    if config.method == "ngram":
        from vllm_lite.spec_decode.ngram import NgramProposer
        return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
    if config.method == "suffix":
        from vllm_lite.spec_decode.suffix import SuffixProposer
        return SuffixProposer(config)
    if config.method == "grammar":
        if structured is None:
            raise ValueError("speculative method 'grammar' needs the engine's tokenizer (this engine has none: "
                             "skip_tokenizer_init)")
        from vllm_lite.spec_decode.grammar_forced import GrammarForcedProposer
        from vllm_lite.spec_decode.ngram import NgramProposer
        return GrammarForcedProposer(structured, NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max))
    return None
