"""The byte-count lower bound on a text's tokens (vllm_lite.tokenizer.max_token_bytes): never above the real count
where it is given, and not given for tokenizers that can drop or merge input text."""
from __future__ import annotations

import random

from tiny_models import make_tiny_tokenizer
from vllm_lite.tokenizer import max_token_bytes, min_token_count

PIECES = ["word ", "tokenize me, ", "é", "日本語", "🙂", "<|im_end|>", "<|im_start|>user\n", "\n\n", "  ", "x" * 40,
          "0123456789", "Ünïcödé ", "\t"]


def test_bound_never_exceeds_the_real_count(tmp_path):
    tok = make_tiny_tokenizer(str(tmp_path / "tok"))
    token_bytes = max_token_bytes(tok)
    assert token_bytes is not None and token_bytes >= len("<|im_start|>")  # added tokens count too
    rng = random.Random(0)
    tight = 0
    for _ in range(300):
        text = "".join(rng.choice(PIECES) for _ in range(rng.randrange(0, 200)))
        for special in (True, False):
            n = len(tok(text, add_special_tokens=special).input_ids)
            bound = min_token_count(text, token_bytes)
            assert bound <= n, (text, bound, n)
            tight += bound * 4 >= n
    assert tight > 0  # the bound is not vacuous


def test_a_huge_text_is_bounded_above_a_context_window(tmp_path):
    tok = make_tiny_tokenizer(str(tmp_path / "tok"))
    assert min_token_count("word " * 2 ** 20, max_token_bytes(tok)) > 256 * 100


def test_no_bound_where_text_can_be_dropped_or_merged(tmp_path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = make_tiny_tokenizer(str(tmp_path / "tok"))
    raw = tok.backend_tokenizer
    raw.normalizer = normalizers.NFC()  # composition can shrink the text
    assert max_token_bytes(PreTrainedTokenizerFast(tokenizer_object=raw)) is None
    raw.normalizer = None
    raw.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(" ", "removed"), pre_tokenizers.ByteLevel()])
    assert max_token_bytes(PreTrainedTokenizerFast(tokenizer_object=raw)) is None
    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "hello": 1}, unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.Whitespace()  # one [UNK] stands for a whole unknown word
    assert max_token_bytes(PreTrainedTokenizerFast(tokenizer_object=wordpiece, unk_token="[UNK]")) is None
    fused = Tokenizer(models.BPE({"a": 0, "[UNK]": 1}, [], unk_token="[UNK]", fuse_unk=True))
    fused.pre_tokenizer = pre_tokenizers.ByteLevel()
    assert max_token_bytes(PreTrainedTokenizerFast(tokenizer_object=fused, unk_token="[UNK]")) is None
    assert max_token_bytes(object()) is None and min_token_count("abc", None) == 0


def test_no_bound_with_an_added_token_that_swallows_whitespace(tmp_path):
    """An added token with lstrip matches any run of spaces before it: "  " * 10**6 + "<mask>" may be one token."""
    from tokenizers import AddedToken
    tok = make_tiny_tokenizer(str(tmp_path / "tok"))
    assert max_token_bytes(tok) is not None
    tok.backend_tokenizer.add_special_tokens([AddedToken("<mask>", lstrip=True)])
    text = " " * 5000 + "<mask>"
    assert len(tok(text, add_special_tokens=False).input_ids) < 5000 // 13  # what a bound would have claimed
    assert max_token_bytes(tok) is None
