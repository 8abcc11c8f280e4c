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


def tokenizer_for(text_name: str, text_init: str, prepared: Path) -> PreTrainedTokenizerBase:
    """The vocabulary trained by `prepare` for a random text backbone, else the backbone's own tokenizer."""
    from avse.model.backbones import source

    if text_init == "random":
        folder = prepared / "tokenizer"
        if not folder.exists():
            raise DataError(f"{folder}: no trained tokenizer (run the prepare stage with model.text.init: random)")
        return load_tokenizer(folder)
    return load_tokenizer(source(text_name))


class CaptionTokenizer:
    """Callable that turns a list of captions into padded `input_ids` and `attention_mask` `[B, L]`."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_len: int):
        self.tokenizer, self.max_len = tokenizer, max_len

    def __call__(self, captions: list[str]):
        encoded = self.tokenizer(captions, padding=True, truncation=True, max_length=self.max_len, return_tensors="pt")
        return encoded["input_ids"], encoded["attention_mask"]
