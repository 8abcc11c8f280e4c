"""The text encoder: dropout on BERT's token features (`model.text_dropout`) and captions longer than its positions."""

import pytest
import torch

from avse.config import from_dict
from avse.errors import DataError
from avse.model.avse import build_model
from avse.training.dry_run import random_batch


def text_encoder(dropout: float, seed: int = 0):
    torch.manual_seed(seed)  # the same weights for every dropout
    return build_model(from_dict({"model": {"text_dropout": dropout}}), vocab_size=100).text_encoder


def encode(encoder, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(5, 100, (4, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    torch.manual_seed(seed)  # BERT's own dropout, and ours, draw from the global generator
    return encoder(ids, mask)


def test_text_dropout_reaches_the_model():
    assert text_encoder(0.2).dropout.p == 0.2
    assert text_encoder(0.0).dropout.p == 0.0


def test_text_dropout_drops_bert_features_before_projection_and_mlp_in_training_only():
    encoder = text_encoder(0.5).train()
    seen = {}
    encoder.backbone.register_forward_hook(lambda module, args, output: seen.update(bert=output.last_hidden_state))
    encoder.fc.register_forward_hook(lambda module, args, output: seen.update(fc=args[0]))
    encoder.mlp.register_forward_hook(lambda module, args, output: seen.update(mlp=args[0]))
    encode(encoder)
    bert, dropped = seen["bert"], seen["fc"]
    assert torch.equal(seen["mlp"], dropped)  # one dropout, shared by both branches
    zeros = dropped == 0
    assert 0.4 < zeros.float().mean() < 0.6
    assert torch.allclose(dropped[~zeros], bert[~zeros] * 2)  # kept features scaled by 1 / (1 - p)
    encoder.eval()
    encode(encoder)
    assert torch.equal(seen["fc"], seen["bert"])
    assert torch.equal(encode(encoder), encode(text_encoder(0.0).eval()))
    assert not torch.equal(encode(encoder.train()), encode(text_encoder(0.0).train()))


def test_zero_text_dropout_changes_no_bit_and_draws_nothing():
    encoder = text_encoder(0.0).train()
    reference = text_encoder(0.0).train()
    reference.dropout = torch.nn.Identity()
    assert torch.equal(encode(encoder), encode(reference))
    torch.manual_seed(5)
    tokens = torch.randn(2, 3, 128)
    state = torch.get_rng_state()
    assert encoder.dropout(tokens) is tokens and torch.equal(torch.get_rng_state(), state)


def test_an_untruncated_caption_longer_than_the_positions_is_a_clear_error():
    encoder = text_encoder(0.0).eval()
    ids = torch.randint(5, 100, (2, 129))
    with pytest.raises(DataError, match=r"a caption of 129 word pieces is longer than the text backbone's 128 positions "
                                        r"\(model.text.max_len: 0 does not truncate\); set model.text.max_len to at most 128"):
        encoder(ids, torch.ones_like(ids))
    assert encoder(ids[:, :128], torch.ones_like(ids[:, :128])).shape == (2, 256)


def test_dry_run_without_truncation_uses_the_longest_captions_the_backbone_takes():
    config = from_dict({"model": {"text": {"name": "bert-tiny", "max_len": 0}}, "train": {"batch_size": 2}})
    _, input_ids, attention_mask, _ = random_batch(config, 100, torch.device("cpu"))
    assert input_ids.shape == attention_mask.shape == (2, 128)
