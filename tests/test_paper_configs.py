"""The README's paper configurations stay valid parameter sets as the parameters evolve."""

import re
import shlex
from pathlib import Path

import pytest

from avse.config import load_config

REPO = Path(__file__).resolve().parents[1]


def readme_configurations() -> dict[str, list[str]]:
    """`{experiment name: [key=value, ...]}` of every `dvc exp run -n NAME ...` row, shell variables expanded."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    variables = {name: value.replace("\\\n", " ") for name, value in re.findall(r'^(\w+)="((?:[^"\\]|\\\n)*)"', text, re.M)}
    configurations = {}
    for name, arguments in re.findall(r"^\| [^|]+ \| `dvc exp run -n (\S+) ([^`]+)` \|$", text, re.M):
        words = shlex.split(re.sub(r"\$(\w+)", lambda m: variables[m.group(1)], arguments))
        assert words[::2] == ["-S"] * (len(words) // 2), f"{name}: expected only -S key=value arguments"
        configurations[name] = words[1::2]
    return configurations


def test_the_readme_lists_the_six_paper_configurations():
    assert sorted(readme_configurations()) == sorted(
        ["f30k-vit-224", "f30k-swin-224", "coco-vit-224", "coco-swin-224", "f30k-vit-384", "f30k-swin-384"]
    )


@pytest.mark.parametrize("name", sorted(readme_configurations()))
def test_each_paper_configuration_is_valid(name):
    config = load_config(REPO / "params.yaml", readme_configurations()[name])
    dataset, backbone, resolution = name.split("-")
    assert config.data.dataset == dataset
    assert backbone in config.model.vision.name and config.model.vision.init == "pretrained"
    assert (config.model.text.name, config.model.embed_size, config.model.block_dim) == ("bert-base-uncased", 1024, 256)
    # The official training recipe, item by item (the README's table).
    assert (config.train.decorrelation, config.train.decorrelation_weight) == ("official", 1.0)
    assert (config.data.resize, config.data.augment.crop, config.data.augment.flip, config.data.augment.flip_captions) == (
        "stretch", True, True, "keep")
    assert (config.data.cache_res, config.data.caption_augment, config.model.text_dropout, config.model.text.max_len) == (0, 0.2, 0.2, 0)
    assert (config.model.view_sampling, config.model.keep_count, config.model.pixel_stats) == ("nearest", "tokens", "imagenet")
    assert config.model.text_mlp_norm == "batch" and config.model.vision_final_norm == (backbone != "vit")
    assert (config.train.lr_schedule, config.train.epochs) == ("step", 30)
    # The paper's global batch of 128, split over the processes of the multi-GPU rows.
    assert config.train.batch_size * config.train.nproc_per_node == 128
    assert config.data.img_res == {"224": 256, "384": 384}[resolution]
    assert config.embed.split == ("testall" if dataset == "coco" else "test")
