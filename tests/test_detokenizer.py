"""The detokenizer's fast decode: the Rust tokenizer directly, only where transformers' decode returns the same text."""
from __future__ import annotations

import random

from tiny_models import make_tiny_tokenizer
from vllm_lite.detokenizer import IncrementalDetokenizer, backend_decode


def test_backend_decode_equals_transformers_decode(tmp_path):
    tok = make_tiny_tokenizer(str(tmp_path / "tok"))
    fast = backend_decode(tok)
    assert fast is not None
    rng = random.Random(0)
    for _ in range(500):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 10))]
        for skip in (True, False):
            assert fast(ids, skip) == tok.decode(ids, skip_special_tokens=skip)


def test_backend_decode_refused_where_transformers_would_clean_up(tmp_path):
    """WordPiece with clean_up_tokenization_spaces: transformers rewrites the text, so the wrapper is kept."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"[UNK]": 0, "hello": 1, "world": 2, ",": 3, "!": 4, "##s": 5}
    raw = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.decoder = decoders.WordPiece()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", clean_up_tokenization_spaces=True)
    assert backend_decode(tok) is None
    detok = IncrementalDetokenizer(tok, [1])
    detok.update([3, 2, 4])
    assert detok.output_text == tok.decode([1, 3, 2, 4])[len(tok.decode([1])):]


def test_backend_decode_none_for_other_objects():
    assert backend_decode(object()) is None
