"""Backbones loaded from folders written by `save_pretrained`, as a user's downloaded weights are."""

import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel, SwinConfig, SwinModel, ViTConfig, ViTModel

from avse.config import from_dict
from avse.errors import ConfigError
from avse.model import backbones
from avse.model.avse import build_model
from conftest import REPO, run

SAVED_RES = 32  # the vision backbones are saved for 32 px and trained at another resolution
TRAIN_RES = {"vit": 48, "swin": 64}


SAVED: dict[str, dict[str, torch.Tensor]] = {}  # each saved model's own state dict (the files may name its keys differently)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Small ViT, Swin and BERT models with their own random weights, each saved with `save_pretrained`."""
    root = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    models = {
        "vit": ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                  patch_size=8, image_size=SAVED_RES)),
        "swin": SwinModel(SwinConfig(embed_dim=16, depths=[2, 2], num_heads=[2, 4], patch_size=4, window_size=4, image_size=SAVED_RES)),
        "bert": BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)),
    }
    for family, model in models.items():
        model.save_pretrained(root / family)
        SAVED[family] = {k: v.clone() for k, v in model.state_dict().items()}
    # A saved text backbone carries its tokenizer: the uncased WordPiece vocabulary of the bundled MiniLM.
    AutoTokenizer.from_pretrained(backbones.source("minilm")).save_pretrained(root / "bert")
    return {family: root / family for family in models}


def loaded_millions(family: str) -> str:
    """The saved model's parameters without its pooler, in millions, as the load line writes them."""
    count = sum(v.numel() for k, v in SAVED[family].items() if not k.startswith("pooler."))
    return f"{count / 1e6:.3g}M"


def assert_equal_to_saved(state: dict[str, torch.Tensor], family: str) -> None:
    """Every tensor of a backbone's `state` is the saved model's; the saved pooler is the only thing left out."""
    saved = SAVED[family]
    assert set(saved) - set(state) <= {"pooler.dense.weight", "pooler.dense.bias"} and set(state) <= set(saved)
    for name, value in state.items():
        assert torch.equal(value, saved[name]), name


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_backbones_start_from_the_saved_weights_with_one_line_each(folders, family, caplog, capfd):
    config = from_dict({"data": {"img_res": TRAIN_RES[family]}, "model": {
        "vision": {"name": str(folders[family]), "init": "pretrained"}, "text": {"name": str(folders["bert"]), "init": "pretrained"}}})
    with caplog.at_level(logging.INFO, logger="avse.model"):
        model = build_model(config, vocab_size=None)
    assert_equal_to_saved(model.image_encoder.backbone.state_dict(), family)
    assert_equal_to_saved(model.text_encoder.backbone.state_dict(), "bert")
    unused_pooler = "; saved but not used: pooler.dense.bias, pooler.dense.weight"
    assert caplog.messages == [
        f"model.vision: {loaded_millions(family)} parameters loaded from {folders[family]}" + (unused_pooler if family == "vit" else ""),
        f"model.text: {loaded_millions('bert')} parameters loaded from {folders['bert']}{unused_pooler}",
    ]
    assert "LOAD REPORT" not in capfd.readouterr().err  # transformers' table of the same keys
    if family == "vit":  # 16 saved positions, interpolated to the 36 patches of 48 px
        assert model.image_encoder.backbone.embeddings.position_embeddings.shape == (1, 1 + 16, 32)
        assert model.image_encoder.interpolate and model.image_encoder.grid == 6


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_training_from_saved_folders_at_another_resolution(folders, family, tmp_path):
    """Two optimiser steps with frozen backbones (backbone_lr_mult 0): the trained model's backbones are the saved ones."""
    overrides = [f"model.vision.name={folders[family]}", "model.vision.init=pretrained", f"model.text.name={folders['bert']}",
                 "model.text.init=pretrained", f"data.img_res={TRAIN_RES[family]}", f"data.cache_res={TRAIN_RES[family]}",
                 "data.synthetic.train_images=20", "data.synthetic.dev_images=5", "data.synthetic.test_images=5",
                 "data.num_workers=0", "train.batch_size=8", "train.max_steps=2", "train.backbone_lr_mult=0",
                 "model.embed_size=64", "model.block_dim=32", "tracking.enabled=false"]
    for stage in ("synthesize", "prepare", "train"):
        result = run([sys.executable, "-m", "avse.cli", stage, "--params", str(REPO / "params.yaml"), *(f"-S{o}" for o in overrides)],
                     cwd=tmp_path)
    assert f"model.vision: {loaded_millions(family)} parameters loaded from {folders[family]}" in result.stderr
    assert "training done: 2 steps" in result.stderr
    checkpoint = torch.load(tmp_path / "models" / "best.pt", weights_only=True)
    assert checkpoint["vision_image_size"] == SAVED_RES and checkpoint["config"]["data"]["img_res"] == TRAIN_RES[family]
    for prefix, saved in (("image_encoder.backbone.", family), ("text_encoder.backbone.", "bert")):
        assert_equal_to_saved({k.removeprefix(prefix): v for k, v in checkpoint["model"].items() if k.startswith(prefix)}, saved)


def test_a_folder_without_weights_for_the_model_is_refused_with_their_names(folders, tmp_path):
    """A checkpoint of another depth would otherwise train from partly random weights, silently."""
    folder = tmp_path / "vit-deeper"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((folders["vit"] / "model.safetensors").read_bytes())
    config = json.loads((folders["vit"] / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 3}))
    with pytest.raises(ConfigError, match=rf"^model.vision.name: '{folder}' has no weights for 16 parameters of the model "
                                          r"\(layers.2.attention.k_proj.bias, .* and 11 more\); is it a checkpoint of this architecture\?$"):
        build_model(from_dict({"data": {"img_res": 32}, "model": {"vision": {"name": str(folder), "init": "pretrained"}}}), vocab_size=100)
