"""Backbones, encoders and the AVSE model."""

import pytest
import torch

from avse.config import from_dict
from avse.errors import ConfigError
from avse.model import backbones
from avse.model.avse import build_model


def config(**model):
    data = model.pop("data", {})
    return from_dict({"data": data, "model": model})


def batch(b: int, res: int, vocab: int = 100, length: int = 9):
    images = torch.randint(0, 256, (b, 3, res, res), dtype=torch.uint8)
    input_ids = torch.randint(5, vocab, (b, length))
    mask = torch.ones_like(input_ids)
    mask[0, 6:] = 0
    return images, input_ids, mask


def test_registry_holds_the_published_configs():
    vit = backbones.REGISTRY["google/vit-base-patch16-224-in21k"].config
    assert (vit["hidden_size"], vit["num_hidden_layers"], vit["patch_size"], vit["image_size"]) == (768, 12, 16, 224)
    swin = backbones.REGISTRY["microsoft/swin-base-patch4-window12-384-in22k"].config
    assert (swin["embed_dim"], swin["depths"], swin["window_size"], swin["image_size"]) == (128, [2, 2, 18, 2], 12, 384)


PAPER_TEXT = {"text": {"name": "bert-base-uncased"}, "embed_size": 1024, "block_dim": 256}


@pytest.mark.parametrize("vision, img_res, vision_params", [
    ("google/vit-base-patch16-224-in21k", 256, 85.8),
    ("microsoft/swin-base-patch4-window7-224-in22k", 224, 86.7),
    ("google/vit-base-patch16-384", 384, 86.1),
    ("microsoft/swin-base-patch4-window12-384-in22k", 384, 86.9),
])
def test_paper_architectures_have_their_published_sizes(vision, img_res, vision_params):
    """Built on the meta device (shapes only, nothing allocated): the paper's backbones with BERT-base."""
    cfg = from_dict({"data": {"img_res": img_res, "vocab_size": 30522}, "model": {"vision": {"name": vision}, **PAPER_TEXT}})
    with torch.device("meta"):
        model = build_model(cfg, vocab_size=30522)
    assert sum(p.numel() for p in model.image_encoder.backbone.parameters()) / 1e6 == pytest.approx(vision_params, abs=0.1)
    assert sum(p.numel() for p in model.text_encoder.backbone.parameters()) / 1e6 == pytest.approx(108.9, abs=0.1)  # no pooler


@pytest.mark.parametrize("vision", ["vit-tiny", "swin-tiny"])
def test_dry_run_reports_a_step_of_the_configured_shape(vision, capsys):
    """`avse train --dry-run`: builds, runs optimiser steps on random inputs, reports sizes, speed and memory."""
    from avse.training.dry_run import dry_run

    cfg = from_dict({"model": {"vision": {"name": vision}}, "train": {"batch_size": 2, "precision": "fp32"}})
    report = dry_run(cfg, steps=1)
    assert report["params_vision_m"] == pytest.approx(sum(p.numel() for p in build_model(cfg, 1000).image_encoder.backbone.parameters()) / 1e6)
    assert report["seconds_per_step"] > 0
    assert 0 < report["backward_peak_mb"] <= report["peak_memory_mb"]  # the first backward pass, then the optimiser's state
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the dry run takes the device training would take
    assert f"dry run: {vision} + bert-tiny at 64px, batch 2, float32 on {device}" in capsys.readouterr().out


@pytest.mark.parametrize("vision, vision_params, grid", [
    ("google/vit-base-patch16-384", 86.1, 24),
    ("microsoft/swin-base-patch4-window12-384-in22k", 86.9, 12),
])
def test_paper_architectures_at_384_embed_an_image(vision, vision_params, grid):
    """The 384 px seed architectures build at their resolution and embed an image from their patch grid
    (a training step is the dry run's, tested at 224 above)."""
    model = build_model(from_dict({"data": {"img_res": 384}, "model": {"vision": {"name": vision}, **PAPER_TEXT}}), vocab_size=30522).eval()
    assert sum(p.numel() for p in model.image_encoder.backbone.parameters()) / 1e6 == pytest.approx(vision_params, abs=0.1)
    assert model.image_encoder.grid == grid
    with torch.no_grad():
        embedding = model.encode_image(torch.randint(0, 256, (1, 3, 384, 384), dtype=torch.uint8))
    assert embedding.shape == (1, 2 * 1024)


@pytest.mark.parametrize("vision", ["vit-tiny", "swin-tiny"])
def test_image_embedding_views_are_unit_norm_and_eval_is_deterministic(vision):
    model = build_model(config(vision={"name": vision}), vocab_size=100)
    images, _, _ = batch(3, 64)
    model.eval()
    with torch.no_grad():
        first, second = model.encode_image(images), model.encode_image(images)
    assert torch.equal(first, second)
    norms = first.view(3, 2, 256).norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones(3, 2))
    model.train()
    with torch.no_grad():
        assert not torch.equal(model.encode_image(images), model.encode_image(images))  # random views while training


def test_vit_views_run_the_kept_tokens_only():
    model = build_model(config(vision={"name": "vit-tiny"}, keep_ratio=0.5, eval_keep_ratio=0.25, size_augment=False), vocab_size=100)
    encoder = model.image_encoder
    pixels = encoder.normalize_pixels(batch(2, 64)[0])
    model.train()
    tokens, indices = encoder.view_tokens(pixels)
    assert tokens.shape == (2 * 2, 1 + 32, 128) and indices.shape == (2, 2, 32)
    model.eval()
    tokens, indices = encoder.view_tokens(pixels)
    assert tokens.shape == (2 * 2, 1 + 16, 128)


def test_nearest_training_views_are_the_nearest_patches_of_seeded_patch_centres():
    from avse.model.sampling import radial_bias_indices, view_centres

    model = build_model(config(vision={"name": "vit-tiny"}, view_sampling="nearest", keep_count="tokens"), vocab_size=100).train()
    encoder = model.image_encoder
    pixels = encoder.normalize_pixels(batch(3, 64)[0])
    _, indices = encoder.view_tokens(pixels, torch.Generator().manual_seed(7))
    _, again = encoder.view_tokens(pixels, torch.Generator().manual_seed(7))
    centres = view_centres(3, 2, 8, 8, train=True, at_patches=True, generator=torch.Generator().manual_seed(7))
    assert indices.shape == (3, 2, 52)  # int(0.8 x (64 + 1)) of vit-tiny's 8 x 8 patches at 64 px
    assert torch.equal(indices, again)
    assert torch.equal(indices, radial_bias_indices(centres, 8, 8, 52, noise=False))


@pytest.mark.parametrize("vision, stats, mean, std", [
    ("vit-tiny", "backbone", 0.5, 0.5),
    ("vit-tiny", "imagenet", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ("swin-tiny", "backbone", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
])
def test_pixel_stats(vision, stats, mean, std):
    encoder = build_model(config(vision={"name": vision}, pixel_stats=stats), vocab_size=100).image_encoder
    images = batch(2, 64)[0]
    expected = (images.double() / 255 - torch.tensor(mean, dtype=torch.float64).view(-1, 1, 1)) / torch.tensor(std, dtype=torch.float64).view(-1, 1, 1)
    torch.testing.assert_close(encoder.normalize_pixels(images).double(), expected, rtol=0, atol=1e-5)


def test_swin_views_come_from_the_final_grid():
    model = build_model(config(vision={"name": "swin-tiny"}, keep_ratio=0.5), vocab_size=100).train()
    tokens, indices = model.image_encoder.view_tokens(model.image_encoder.normalize_pixels(batch(2, 64)[0]))
    assert model.image_encoder.grid == 8  # 64 / patch 4 / 2 (two stages)
    assert tokens.shape == (2 * 2, 32, 96) and int(indices.max()) < 64


def test_swin_window_must_fit_the_resolution():
    with pytest.raises(ConfigError, match=r"data.img_res: 16 is too small for model.vision.name 4-token windows .* use at least 32"):
        build_model(config(vision={"name": "swin-tiny"}, data={"img_res": 16}), vocab_size=100)


def test_text_longer_than_the_backbone_positions_is_refused():
    with pytest.raises(ConfigError, match=r"model.text.max_len: 300 is longer than bert-tiny's 128 positions"):
        build_model(config(text={"name": "bert-tiny", "max_len": 300}), vocab_size=100)


def test_unknown_backbone_name_is_explained(tmp_path):
    with pytest.raises(ConfigError, match=r"model.vision.name: cannot load a config for 'no-such-model'"):
        build_model(config(vision={"name": "no-such-model"}), vocab_size=100)


def test_text_backbone_must_be_bert():
    with pytest.raises(ConfigError, match=r"model.text.name: 'vit-tiny' is a vit model, expected bert"):
        build_model(config(text={"name": "vit-tiny"}), vocab_size=100)


def test_pretrained_minilm_text_encoder_loads_offline():
    cfg = config(text={"name": "minilm", "init": "pretrained"})
    model = build_model(cfg, vocab_size=None)
    assert model.text_encoder.backbone.config.hidden_size == 384
    from avse.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(backbones.source("minilm"))
    encoded = tokenizer(["a red circle"], return_tensors="pt")
    assert model.encode_text(encoded["input_ids"], encoded["attention_mask"]).shape == (1, 256)


def test_single_view_full_block_similarity_is_cosine():
    model = build_model(config(views=1, block_dim=256), vocab_size=100).eval()
    images, input_ids, mask = batch(3, 64)
    with torch.no_grad():
        img, cap = model(images, input_ids, mask)
        expected = torch.nn.functional.normalize(img, dim=1) @ torch.nn.functional.normalize(cap, dim=1).T
        torch.testing.assert_close(model.similarity(img, cap), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vision, block", [("vit-tiny", "ViTLayer"), ("swin-tiny", "SwinLayer")])
def test_activation_checkpointing_recomputes_each_block_for_the_same_gradients(vision, block, dtype):
    """train.grad_checkpointing: every transformer block of both backbones runs again in the backward pass
    (once: a Swin stage is not checkpointed around its checkpointed blocks), and the gradients are the same bits.
    In bf16 the recomputation runs attention with the forward pass's kernels, chosen in a context it has left."""
    from avse.compute import autocast
    from avse.training.distributed import DistContext
    from avse.training.objective import contrastive_loss

    images, input_ids, mask = batch(4, 64)
    results = []
    for checkpointing in (False, True):
        cfg = from_dict({"model": {"vision": {"name": vision}, "text_dropout": 0.2}, "train": {"grad_checkpointing": checkpointing}})
        torch.manual_seed(0)
        model = build_model(cfg, vocab_size=100).train()
        calls = {"vision": 0, "text": 0}
        for part, encoder in (("vision", model.image_encoder), ("text", model.text_encoder)):
            for module in encoder.backbone.modules():
                if type(module).__name__ in (block, "BertLayer"):  # counted inside the block, where recomputation runs
                    next(module.children()).register_forward_hook(lambda *_, part=part: calls.__setitem__(part, calls[part] + 1))
        torch.manual_seed(1)  # dropout and views draw alike in both runs
        with autocast(torch.device("cpu"), dtype):
            img, cap = model(images, input_ids, mask)
        contrastive_loss(model, img, cap, torch.arange(4), DistContext(0, 0, 1, torch.device("cpu")), cfg, epoch=1).backward()
        results.append(({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, calls))
    (plain, plain_calls), (checkpointed, checkpointed_calls) = results
    assert plain_calls == {"vision": 4, "text": 2}  # 4 vision blocks, 2 BERT layers
    assert checkpointed_calls == {"vision": 8, "text": 4}
    assert plain.keys() == checkpointed.keys()
    assert all(torch.equal(plain[name], checkpointed[name]) for name in plain)


def autograd_ops(tensor: torch.Tensor) -> set[str]:
    """The names of the backward functions `tensor`'s gradient would run."""
    ops, frontier = set(), [tensor.grad_fn]
    while frontier:
        node = frontier.pop()
        ops.add(type(node).__name__)
        frontier += [next_node for next_node, _ in node.next_functions if next_node is not None]
    return ops


@pytest.mark.parametrize("saved, grid", [(14, (16, 16)), (16, (24, 24)), (4, (6, 5))])
def test_position_interpolation_is_transformers_bicubic_without_its_backward(saved, grid):
    """The paper's ViT rows feed 256 px to 224 px weights: positions are resized as transformers does, through
    matrix products, because bicubic upsampling's backward is not deterministic on CUDA."""
    from transformers.models.vit.modeling_vit import ViTConfig, ViTEmbeddings

    from avse.model.encoders import interpolate_positions

    torch.manual_seed(0)
    embeddings = ViTEmbeddings(ViTConfig(hidden_size=8, patch_size=16, image_size=16 * saved))
    tokens = torch.zeros(1, 1 + grid[0] * grid[1], 8)
    expected = embeddings.interpolate_pos_encoding(tokens, 16 * grid[0], 16 * grid[1])
    ours = interpolate_positions(embeddings.position_embeddings, *grid)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    assert "UpsampleBicubic2DBackward0" in autograd_ops(expected) and "UpsampleBicubic2DBackward0" not in autograd_ops(ours)


def test_a_vit_encoder_at_another_resolution_interpolates_through_matrix_products():
    model = build_model(config(data={"img_res": 48}, vision={"name": "vit-tiny"}), vocab_size=100, vision_image_size=64)
    assert model.image_encoder.interpolate  # weights of an 8 x 8 grid at 64 px, run on the 6 x 6 grid of 48 px
    tokens = model.image_encoder.backbone.embeddings(torch.zeros(2, 3, 48, 48), interpolate_pos_encoding=True)
    assert tokens.shape == (2, 1 + 36, 128)
    assert "EinsumBackward0" in autograd_ops(tokens) or "BmmBackward0" in autograd_ops(tokens)
    assert "UpsampleBicubic2DBackward0" not in autograd_ops(tokens)


def test_compile_compiles_each_transformer_block_in_place():
    """train.compile: the blocks of both backbones are compiled where they are, so parameter names and checkpoints do not change."""
    plain = build_model(from_dict({}), vocab_size=100)
    compiled = build_model(from_dict({"train": {"compile": True}}), vocab_size=100)
    blocks = compiled.transformer_blocks()
    assert [type(b).__name__ for b in blocks] == ["ViTLayer"] * 4 + ["BertLayer"] * 2
    assert all(b._compiled_call_impl is not None for b in blocks) and plain.transformer_blocks()[0]._compiled_call_impl is None
    assert compiled.state_dict().keys() == plain.state_dict().keys()
    assert torch._dynamo.config.recompile_limit >= 2 * len(blocks)  # no block is left to run eagerly by the shared limit
