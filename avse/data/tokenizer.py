"""Tokenizers: a WordPiece vocabulary trained on the captions, or a backbone's own."""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from transformers import AutoTokenizer, BertTokenizerFast, PreTrainedTokenizerBase

from avse.errors import DataError

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PREFIX = "##"  # marks a piece that continues a word


def train_wordpiece(captions: Iterable[str], folder: Path, vocab_size: int, min_frequency: int = 2) -> PreTrainedTokenizerBase:
    """Learn a lowercase WordPiece vocabulary (BERT's scheme) from `captions` and save it loadable by `from_pretrained`.

    The same captions always give the same vocabulary, ids included: `tokenizers`' own
    trainer breaks frequency ties in hash-map order, which differs from process to process.
    """
    from tokenizers import BertWordPieceTokenizer

    splitter = BertWordPieceTokenizer(lowercase=True)
    words: Counter[str] = Counter()
    for caption in captions:
        words.update(word for word, _ in splitter.pre_tokenizer.pre_tokenize_str(splitter.normalizer.normalize_str(caption)))
    vocab = learn_wordpiece_vocab(words, vocab_size, min_frequency)
    tokenizer = BertTokenizerFast(tokenizer_object=BertWordPieceTokenizer({token: i for i, token in enumerate(vocab)}, lowercase=True)._tokenizer)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    return tokenizer


def learn_wordpiece_vocab(words: Mapping[str, int], vocab_size: int, min_frequency: int = 2) -> list[str]:
    """The WordPiece vocabulary of word counts `words`, learnt as BPE merges: `[special tokens, alphabet, merges]`.

    Each word starts as its characters, all but the first marked `##` (inside a word). The
    most frequent adjacent pair seen at least `min_frequency` times is merged into one piece,
    until the vocabulary holds `vocab_size` tokens (the alphabet is always kept whole).
    Ties go to the alphabetically first token or pair, so the result depends only on the counts.
    """
    splits = {word: [word[0], *(PREFIX + c for c in word[1:])] for word in sorted(words) if word}
    alphabet: Counter[str] = Counter()
    for word, pieces in splits.items():
        for piece in pieces:
            alphabet[piece] += words[word]
    vocab = [*SPECIAL_TOKENS, *sorted(alphabet, key=lambda piece: (-alphabet[piece], piece))]
    known = set(vocab)
    pair_counts: Counter[tuple[str, str]] = Counter()
    containing: dict[tuple[str, str], dict[str, None]] = defaultdict(dict)  # pair -> the words it occurs in (ordered)
    for word, pieces in splits.items():
        for pair in zip(pieces, pieces[1:]):
            pair_counts[pair] += words[word]
            containing[pair][word] = None
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        negative, pair = heapq.heappop(heap)
        if -negative != pair_counts[pair]:  # a stale entry: the pair's count has changed since it was pushed
            if pair_counts[pair] >= min_frequency:
                heapq.heappush(heap, (-pair_counts[pair], pair))
            continue
        if -negative < min_frequency:
            break
        left, right = pair
        merged = left + right.removeprefix(PREFIX)
        if merged not in known:
            known.add(merged)
            vocab.append(merged)
        changed: set[tuple[str, str]] = set()
        for word in containing.pop(pair):
            old = splits[word]
            new = _merge_pair(old, pair, merged)
            if new == old:
                continue
            for gone in zip(old, old[1:]):
                pair_counts[gone] -= words[word]
                changed.add(gone)
            for added in zip(new, new[1:]):
                pair_counts[added] += words[word]
                containing[added][word] = None
                changed.add(added)
            splits[word] = new
        for other in sorted(changed - {pair}):
            if pair_counts[other] >= min_frequency:
                heapq.heappush(heap, (-pair_counts[other], other))
    return vocab


def _merge_pair(pieces: list[str], pair: tuple[str, str], merged: str) -> list[str]:
    out, i = [], 0
    while i < len(pieces):
        if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == pair:
            out.append(merged)
            i += 2
        else:
            out.append(pieces[i])
            i += 1
    return out


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


def piece_lengths(captions: Sequence[str], tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """Untruncated length of each caption in word pieces, `[CLS]` and `[SEP]` included: `[n]` int64.

    Tokenisation with `model.text.max_len` L cuts exactly the captions whose length exceeds L.
    """
    encoded = tokenizer(list(captions), return_attention_mask=False, return_token_type_ids=False, verbose=False)
    return np.array([len(ids) for ids in encoded["input_ids"]], dtype=np.int64)


def augment_caption(caption: str, tokenizer: PreTrainedTokenizerBase, p: float, generator: np.random.Generator) -> list[int]:
    """Token ids `[CLS] pieces [SEP]` of `caption` with the official AVSE caption augmentation (training only), untruncated.

    The words are the fast tokenizer's pre-tokenisation after normalisation (BERT's basic
    tokenizer: punctuation is a word of its own). Each word draws one uniform u: u < p selects
    it, and then u / p < 0.5 replaces every piece of the word by `[MASK]`, < 0.6 replaces every
    piece by a token drawn uniformly from the whole vocabulary (special tokens included, as the
    official `random.choice(list(tokenizer.vocab.keys()))`), else deletes the word. At p = 0.2:
    10 % of words masked, 2 % replaced, 8 % deleted. `[CLS]` and `[SEP]` are never touched.

    Draws from `generator`, in this order: `random(words)`, then `integers(len(tokenizer),
    size=replaced pieces)`; so an item's own generator (seeded by run seed, epoch and item)
    makes its augmentation independent of batch composition and worker count.
    """
    encoding = tokenizer(caption, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False, verbose=False)
    ids = np.array(encoding["input_ids"], dtype=np.int64)  # [pieces]
    word_of = np.array(encoding.word_ids(), dtype=np.int64)  # [pieces] the word each piece belongs to
    u = generator.random(int(word_of[-1]) + 1 if len(ids) else 0)  # [words]
    selected = (u < p)[word_of]
    choice = (u / p if p > 0 else u)[word_of]  # only read where selected, where it lies in [0, 1)
    mask = selected & (choice < 0.5)
    replace = selected & (choice >= 0.5) & (choice < 0.6)
    ids[mask] = tokenizer.mask_token_id
    ids[replace] = generator.integers(len(tokenizer), size=int(replace.sum()))
    kept = ids[~(selected & (choice >= 0.6))]
    return [tokenizer.cls_token_id, *kept.tolist(), tokenizer.sep_token_id]


class CaptionTokenizer:
    """Callable that turns a list of captions into padded `input_ids` and `attention_mask` `[B, L]`.

    `max_len` caps L, `[CLS]` and `[SEP]` included (0: no truncation, L is the batch's longest
    caption). `augment` is `data.caption_augment`, the word probability of `augment_caption`;
    it applies only to calls that pass generators (training batches), never to evaluation.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_len: int, augment: float = 0.0):
        self.tokenizer, self.max_len, self.augment = tokenizer, max_len, augment

    def __call__(self, captions: list[str], generators: Sequence[np.random.Generator] | None = None) -> tuple[Tensor, Tensor]:
        """`captions` `[B]` (and one generator per caption, to augment) -> `input_ids`, `attention_mask` `[B, L]` int64."""
        if generators is None or not self.augment:
            encoded = self.tokenizer(captions, padding=True, truncation=self.max_len > 0, max_length=self.max_len or None, return_tensors="pt")
            return encoded["input_ids"], encoded["attention_mask"]
        if len(generators) != len(captions):
            raise ValueError(f"{len(generators)} generators for {len(captions)} captions; give one per caption")
        rows = [augment_caption(caption, self.tokenizer, self.augment, g) for caption, g in zip(captions, generators)]
        if self.max_len:  # as the tokenizer truncates: the first max_len - 2 pieces between [CLS] and [SEP]
            rows = [row if len(row) <= self.max_len else row[: self.max_len - 1] + row[-1:] for row in rows]
        length = max(map(len, rows))
        input_ids = torch.full((len(rows), length), self.tokenizer.pad_token_id, dtype=torch.int64)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.int64)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
        return input_ids, attention_mask
