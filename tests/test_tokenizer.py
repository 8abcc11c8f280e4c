"""Caption tokenisation: the official caption augmentation, truncation (or none), and caption lengths in word pieces."""

import json
import math
import re

import numpy as np
import pytest
import torch

from conftest import F30K_FIXTURES, make_config
from avse.data.dataset import PreparedSplit
from avse.data.tokenizer import CaptionTokenizer, augment_caption, piece_lengths, train_wordpiece
from avse.errors import ConfigError, DataError
from avse.data.prepare import caption_length_report

# Multi-piece words (gauges, blitz, crocheted, multi), punctuation, an accent and an apostrophe.
CAPTIONS = [
    "A man with gauges and glasses is wearing a Blitz hat.",
    "Two crocheted, multi-colored hats!",
    "Café owner's umbrella-stand",
    "dog",
]


@pytest.fixture(scope="module")
def f30k_captions() -> list[str]:
    path = F30K_FIXTURES / "test_caps.txt"
    if not path.exists():
        pytest.skip(f"Flickr30K caption fixtures not found at {F30K_FIXTURES}")
    return path.read_text().splitlines()


@pytest.fixture(scope="module")
def tokenizer(f30k_captions, tmp_path_factory):
    return train_wordpiece(f30k_captions, tmp_path_factory.mktemp("tokenizer"), vocab_size=1000)


def official_reference(caption: str, tokenizer, p: float, generator: np.random.Generator) -> list[int]:
    """The official `process_caption_bert`, word by word, over BERT's basic words and WordPiece model, with
    `augment_caption`'s documented draw order (every word's uniform first, then the replacing tokens)."""
    backend = tokenizer.backend_tokenizer
    words = [word for word, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(caption))]
    vocab = sorted(tokenizer.get_vocab(), key=tokenizer.get_vocab().get)  # every token, in id order
    uniforms = generator.random(len(words))
    output, random_slots = [], []
    for word, u in zip(words, uniforms):
        pieces = [token.value for token in backend.model.tokenize(word)]
        if u < p:
            u /= p
            if u < 0.5:
                output += ["[MASK]"] * len(pieces)
            elif u < 0.6:
                random_slots += range(len(output), len(output) + len(pieces))
                output += [None] * len(pieces)
            # else: the word is deleted
        else:
            output += pieces
    for slot, drawn in zip(random_slots, generator.integers(len(vocab), size=len(random_slots))):
        output[slot] = vocab[drawn]
    return tokenizer.convert_tokens_to_ids(["[CLS]", *output, "[SEP]"])


def test_augmented_captions_match_a_reference_written_from_the_official_rules(tokenizer):
    actions = set()
    for seed in range(60):
        for caption in CAPTIONS:
            ids = augment_caption(caption, tokenizer, 0.5, np.random.default_rng(seed))
            assert ids == official_reference(caption, tokenizer, 0.5, np.random.default_rng(seed)), (seed, caption)
            pieces = tokenizer(caption)["input_ids"]
            actions |= {"mask"} if tokenizer.mask_token_id in ids else set()
            actions |= {"delete"} if len(ids) < len(pieces) else set()
            actions |= {"replace"} if set(ids) - set(pieces) - {tokenizer.mask_token_id} else set()
    assert actions == {"mask", "delete", "replace"}
    # A multi-piece word is masked whole: "crocheted" is 4 pieces, masked together or not at all.
    masked = [augment_caption("crocheted", tokenizer, 0.99, np.random.default_rng(seed)) for seed in range(20)]
    assert len(tokenizer.tokenize("crocheted")) == 4
    assert [2, 4, 4, 4, 4, 3] in masked and all(len(ids) in (2, 6) for ids in masked)
    # One generator state, one result; the whole caption deleted leaves [CLS] [SEP].
    assert augment_caption(CAPTIONS[0], tokenizer, 0.5, np.random.default_rng(7)) == augment_caption(CAPTIONS[0], tokenizer, 0.5, np.random.default_rng(7))
    assert augment_caption("", tokenizer, 0.5, np.random.default_rng(0)) == [tokenizer.cls_token_id, tokenizer.sep_token_id]


@pytest.mark.parametrize("max_len", [0, 8, 32])
def test_without_augmentation_the_output_is_plain_tokenisation(tokenizer, max_len):
    expected = tokenizer(CAPTIONS, padding=True, truncation=max_len > 0, max_length=max_len or None, return_tensors="pt")
    generators = [np.random.default_rng(i) for i in range(len(CAPTIONS))]
    outputs = [
        CaptionTokenizer(tokenizer, max_len)(CAPTIONS),
        CaptionTokenizer(tokenizer, max_len, augment=0.0)(CAPTIONS, generators),
        CaptionTokenizer(tokenizer, max_len, augment=0.2)(CAPTIONS),  # evaluation passes no generators
        # The augmenting path with no word drawn below p: its own truncation and padding.
        CaptionTokenizer(tokenizer, max_len, augment=1e-12)(CAPTIONS, generators),
    ]
    for input_ids, attention_mask in outputs:
        assert input_ids.dtype == attention_mask.dtype == torch.int64
        assert torch.equal(input_ids, expected["input_ids"]) and torch.equal(attention_mask, expected["attention_mask"])
    assert outputs[0][0].shape[1] == (min(max_len, 19) if max_len else 19)  # the first caption: 17 pieces + [CLS] + [SEP]


def test_special_tokens_and_padding_are_never_augmented(tokenizer):
    tokenize = CaptionTokenizer(tokenizer, 12, augment=0.95)
    for seed in range(30):
        input_ids, attention_mask = tokenize(CAPTIONS, [np.random.default_rng([seed, i]) for i in range(len(CAPTIONS))])
        lengths = attention_mask.sum(1)
        assert (input_ids[:, 0] == tokenizer.cls_token_id).all()
        assert (input_ids[torch.arange(len(CAPTIONS)), lengths - 1] == tokenizer.sep_token_id).all()
        assert torch.equal(attention_mask, (torch.arange(input_ids.size(1)) < lengths[:, None]).long())
        assert (input_ids[attention_mask == 0] == tokenizer.pad_token_id).all()
        assert input_ids.size(1) == lengths.max() <= 12


def test_augmentation_frequencies_at_the_official_rate(tokenizer):
    """Every word is the one piece "a", so each output tells its words' fates: at p = 0.2, 10 % masked,
    2 % replaced by a random token (which may draw "a" or [MASK] again: 1 in 1000 each) and 8 % deleted."""
    words_per_caption, captions = 500, 40
    n = words_per_caption * captions
    a, mask = tokenizer.convert_tokens_to_ids("a"), tokenizer.mask_token_id
    masked = replaced = deleted = 0
    for seed in range(captions):
        ids = np.array(augment_caption("a " * words_per_caption, tokenizer, 0.2, np.random.default_rng(seed))[1:-1])
        masked += int((ids == mask).sum())
        replaced += int(((ids != a) & (ids != mask)).sum())
        deleted += n // captions - len(ids)
    chance = 1 / len(tokenizer)
    for count, rate in ((masked, 0.1 + 0.02 * chance), (replaced, 0.02 * (1 - 2 * chance)), (deleted, 0.08)):
        # Five binomial standard deviations: a false alarm about once in 3.5 million.
        assert abs(count - n * rate) < 5 * math.sqrt(n * rate * (1 - rate)), (count, n * rate)


def test_one_generator_per_caption_is_required(tokenizer):
    with pytest.raises(ValueError, match="3 generators for 4 captions"):
        CaptionTokenizer(tokenizer, 32, augment=0.2)(CAPTIONS, [np.random.default_rng(0)] * 3)


def test_caption_parameters_are_validated():
    assert make_config({"model": {"text": {"max_len": 0}}}).model.text.max_len == 0
    for tree, expected in [
        ({"model": {"text": {"max_len": 1}}}, "model.text.max_len: 1 is not 0 (no truncation) or an integer >= 2 ([CLS] and [SEP] count)"),
        ({"model": {"text": {"max_len": -3}}}, "model.text.max_len: -3 is not 0 (no truncation)"),
        ({"data": {"caption_augment": 1.0}}, "data.caption_augment: 1.0 is not a number in [0, 1)"),
        ({"model": {"text_dropout": -0.1}}, "model.text_dropout: -0.1 is not a number in [0, 1)"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(expected)):
            make_config(tree)
    defaults = make_config()
    assert (defaults.data.caption_augment, defaults.model.text_dropout) == (0.0, 0.0)


def test_piece_lengths_count_exactly_the_captions_tokenisation_truncates(tokenizer, f30k_captions):
    lengths = piece_lengths(f30k_captions, tokenizer)
    assert lengths.shape == (5000,)
    assert np.array_equal(lengths, [len(tokenizer.tokenize(c)) + 2 for c in f30k_captions])
    for max_len in (16, 24, 32):  # a caption is cut when it has more pieces than max_len: its mask is then full
        _, attention_mask = CaptionTokenizer(tokenizer, max_len)(f30k_captions)
        assert ((lengths > max_len) <= (attention_mask.sum(1).numpy() == max_len)).all()
    assert 0 < (lengths > 24).sum() < 5000


def hand_made_split(captions: list[str], name: str = "train") -> PreparedSplit:
    n = len(captions)
    return PreparedSplit(name, captions, np.arange(n), np.arange(n), [f"{i}.jpg" for i in range(n)], None)


def test_the_train_log_counts_the_truncated_captions(tmp_path, tokenizer):
    # 4 + 2, 11 + 2 (gauges is 4 pieces) and 1 + 2 pieces, counted with the tokenizer of a pretrained backbone; prepare's
    # record of the lengths is used when the tokenizer is prepare's (a random text backbone).
    split = hand_made_split(["a man in hats", "a man with gauges is in a hat", "dog"])
    (tmp_path / "stats.json").write_text('{"train": {"pieces_per_caption": {"counts": {"3": 1, "6": 90, "40": 9}}}}')
    pretrained = make_config({"model": {"text": {"init": "pretrained", "max_len": 6}}})
    assert caption_length_report(split, tmp_path, pretrained, tokenizer, 128) == (
        "train: 1 of 3 captions are longer than model.text.max_len 6 word pieces (longest 13); they are truncated")
    random = make_config({"model": {"text": {"max_len": 6}}})
    assert caption_length_report(split, tmp_path, random, tokenizer, 128) == (
        "train: 9 of 100 captions are longer than model.text.max_len 6 word pieces (longest 40); they are truncated")
    untruncated = make_config({"model": {"text": {"init": "pretrained", "max_len": 0}}})
    assert caption_length_report(split, tmp_path, untruncated, tokenizer, 13) == (
        "train: model.text.max_len is 0, so no caption is truncated (longest 13 word pieces)")


def test_an_untruncated_caption_longer_than_the_backbone_names_its_line(tmp_path, tokenizer):
    split = hand_made_split(["a dog", "a man with gauges is in a hat", "a man in a hat"], name="dev")
    config = make_config({"model": {"text": {"name": "bert-tiny", "max_len": 0}}})
    with pytest.raises(DataError, match=r"dev.csv line 3: a caption of 13 word pieces is longer than bert-tiny's 10 "
                                        r"positions, and model.text.max_len: 0 does not truncate; set model.text.max_len to at most 10"):
        caption_length_report(split, tmp_path, config, tokenizer, 10)


def test_the_train_log_agrees_with_a_direct_count_on_flickr30k(tmp_path, tokenizer, f30k_captions):
    from avse.data.formats import Caption
    from avse.data.prepare import caption_stats

    stats = caption_stats([Caption(text, i // 5, f"test_caps.txt:{i + 1}") for i, text in enumerate(f30k_captions)], tokenizer)
    (tmp_path / "stats.json").write_text(json.dumps({"test": stats}))
    split = hand_made_split(f30k_captions, name="test")
    lengths = [len(tokenizer.tokenize(c)) + 2 for c in f30k_captions]
    cut = sum(length > 24 for length in lengths)
    expected = f"test: {cut} of 5000 captions are longer than model.text.max_len 24 word pieces (longest {max(lengths)}); they are truncated"
    assert caption_length_report(split, tmp_path, make_config({"model": {"text": {"max_len": 24}}}), tokenizer, 128) == expected
    assert stats["pieces_per_caption"]["max"] == max(lengths) and sum(stats["pieces_per_caption"]["counts"].values()) == 5000
