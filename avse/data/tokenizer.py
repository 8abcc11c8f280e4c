"""Tokenizers: a WordPiece vocabulary trained on the captions, or a backbone's own."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from transformers import AutoTokenizer, BertTokenizerFast, PreTrainedTokenizerBase

from avse.errors import DataError

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece(captions: Iterable[str], folder: Path, vocab_size: int) -> PreTrainedTokenizerBase:
    """Train a lowercase WordPiece vocabulary (BERT's scheme) and save it loadable by `from_pretrained`."""
    from tokenizers import BertWordPieceTokenizer

    trainer = BertWordPieceTokenizer(lowercase=True)
    trainer.train_from_iterator(captions, vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tokenizer = BertTokenizerFast(tokenizer_object=trainer._tokenizer)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    return tokenizer


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    """A tokenizer from a local folder or a hub id (the hub needs network or a warm cache)."""
    try:
        return AutoTokenizer.from_pretrained(str(name_or_path))
    except (OSError, ValueError) as err:
        raise DataError(f"cannot load a tokenizer from {name_or_path}: {err}".splitlines()[0]) from None
