"""The paper's rows (experiments.yaml): valid, the official recipe, one command each, and each trains on its
own process count."""

import re
import sys
from pathlib import Path

import pytest
import torch

from avse import cli
from avse.errors import ConfigError
from avse.experiments import format_value, load_experiments, markdown_table
from avse.model import backbones
from avse.model.avse import build_model, parameters_without_gradient
from avse.training.distributed import DistContext
from avse.training.objective import contrastive_loss
from conftest import REPO, run

EXPERIMENTS = load_experiments(REPO / "experiments.yaml")
PARAMS = REPO / "params.yaml"
# What a CPU cannot hold, scaled down; everything else is the row's own. The rows' data settings
# (where Flickr30K and COCO live) are replaced by the embedded data.
DATA_LOCATION = ("data.dataset", "data.root", "data.images", "embed.split")
TINY_BACKBONE = {"vit": "vit-tiny", "swin": "swin-tiny"}
SMALL = ["model.vision.init=random", "model.text.name=bert-tiny", "model.text.init=random", "data.img_res=64",
         "train.batch_size=4", "train.max_steps=3", "model.embed_size=256", "model.block_dim=64"]
SMALL_DATA = ["data.synthetic.train_images=40", "data.synthetic.dev_images=8", "data.synthetic.test_images=8",
              "data.cache_res=0", "data.vocab_size=200", "data.num_workers=0", "tracking.enabled=false"]


def scaled_down(name: str) -> list[str]:
    """The row's overrides with tiny random backbones of the same family, 64 px and batch 4 per process."""
    experiment = EXPERIMENTS[name]
    family = backbones.REGISTRY[experiment.settings["model.vision.name"]].family
    own = [o for o in experiment.overrides() if o.partition("=")[0] not in DATA_LOCATION]
    return [*own, f"model.vision.name={TINY_BACKBONE[family]}", *SMALL, *SMALL_DATA]


def test_the_file_holds_the_six_paper_rows_on_their_process_counts():
    assert {name: e.processes for name, e in EXPERIMENTS.items()} == {
        "f30k-vit-224": 1, "f30k-swin-224": 1, "coco-vit-224": 1, "coco-swin-224": 1, "f30k-vit-384": 2, "f30k-swin-384": 4}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_each_row_is_the_official_recipe(name):
    config = EXPERIMENTS[name].config(PARAMS)
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
    assert (config.train.lr_schedule, config.train.epochs, config.train.loss) == ("step", 30, "hinge")
    # The paper's global batch of 128, split over the processes of the multi-GPU rows.
    assert config.train.batch_size * config.train.nproc_per_node == 128
    assert config.data.img_res == {"224": 256, "384": 384}[resolution]
    assert config.embed.split == ("testall" if dataset == "coco" else "test")


def test_the_readme_table_is_the_files():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert markdown_table(EXPERIMENTS) in readme, "README.md: paste the output of `avse exp --table` into its paper section"


def test_a_row_runs_as_one_dvc_command_with_extra_settings_last(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert cli.main(["exp", "f30k-vit-384", "--queue", "--print", "-S", "train.seed=3"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed[:7] == ["dvc", "exp", "run", "-n", "f30k-vit-384", "--queue", "-S"]
    settings = printed[7::2]
    assert settings == [*EXPERIMENTS["f30k-vit-384"].overrides(), "train.seed=3"]
    assert "train.nproc_per_node=2" in settings and "train.lr=0.0002" in settings


def test_rows_are_listed_shown_and_chosen_by_pattern(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert cli.main(["exp", "--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == list(EXPERIMENTS)
    assert "f30k-swin-384  Flickr30K, Swin-B 384, 4 process(es), evaluated on the 1K test" in listed
    assert cli.main(["exp", "coco-*", "--show"]) == 0
    shown = capsys.readouterr().out
    assert re.findall(r"^# (\S+):", shown, re.M) == ["coco-vit-224", "coco-swin-224"]
    assert "embed.split=testall" in shown and "model.vision_final_norm=false" in shown
    assert cli.main(["exp", "f30k-vit-224", "--evaluate", "--print"]) == 0
    assert capsys.readouterr().out.splitlines() == ["dvc exp apply f30k-vit-224", "dvc repro evaluate"]


@pytest.mark.parametrize("argv, message", [
    (["exp", "f30k-vit-999"], "error: no experiment 'f30k-vit-999' in experiments.yaml (experiments: f30k-vit-224, "),
    (["exp", "f30k-vit-224", "--print", "-S", "train.batch_sise=8"], "error: train.batch_sise: unknown key (did you mean train.batch_size?)"),
])
def test_a_wrong_name_or_setting_stops_before_dvc_runs(argv, message, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(message) and "dvc exp run" not in captured.out


@pytest.mark.parametrize("text, message", [
    ("groups: {a: {train.lr: 0.1}, b: {train.lr: 0.2}}\nexperiments: {x: {uses: [a, b]}}",
     "experiments.x.uses: groups 'a' and 'b' both set train.lr"),
    ("groups: {a: {train.lr: 0.1}}\nexperiments: {x: {uses: [c]}}", "experiments.x.uses: no group 'c' (groups: a)"),
    ("experiments: {x: {set: {data.root: 'true'}}}", "experiments.x.set.data.root: 'true' does not survive -S data.root=true"),
    ("experiments: {x: {sets: {train.lr: 0.1}}}", "experiments.x: unknown keys ['sets']"),
])
def test_a_malformed_experiments_file_names_the_entry(tmp_path, text, message):
    path = tmp_path / "experiments.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(f"{path}: {message}")):
        load_experiments(path)


def test_a_row_of_groups_alone_applies_them_in_order(tmp_path):
    path = tmp_path / "experiments.yaml"
    path.write_text("groups: {a: {train.lr: 0.1}, b: {train.epochs: 3}}\nexperiments: {x: {uses: [b, a]}}")
    assert load_experiments(path)["x"].overrides() == ["train.epochs=3", "train.lr=0.1"]


@pytest.mark.parametrize("value, text", [(True, "true"), (0.0002, "0.0002"), (1e-05, "1.0e-05"), ([9, 15], "[9, 15]"), ("data/f30k", "data/f30k")])
def test_values_are_written_as_yaml_reads_them_back(value, text):
    assert format_value(value) == text


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_trainable_parameter_of_each_row_gets_a_gradient(name):
    """DistributedDataParallel's invariant, on one process: a part a row does not use is frozen."""
    from avse.config import load_config

    config = load_config(PARAMS, scaled_down(name))
    torch.manual_seed(0)
    model = build_model(config, vocab_size=200).train()
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    input_ids = torch.randint(5, 200, (4, 9))
    img, cap = model(images, input_ids, torch.ones_like(input_ids))
    contrastive_loss(model, img, cap, torch.arange(4), DistContext(0, 0, 1, torch.device("cpu")), config, epoch=1).backward()
    assert parameters_without_gradient(model) == []
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    vit_final_norm = {"image_encoder.backbone.layernorm.weight", "image_encoder.backbone.layernorm.bias"}
    assert frozen == {"logit_scale", "dustbin"} | (vit_final_norm if "vit" in name else set())  # hinge loss, max matching


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """The embedded data, small, prepared once as the paper rows read it: JPEGs decoded while training."""
    root = tmp_path_factory.mktemp("rows")
    for stage in ("synthesize", "prepare"):
        run([sys.executable, "-m", "avse.cli", stage, "--params", str(PARAMS), *(f"-S{o}" for o in scaled_down("f30k-vit-224"))], cwd=root)
    return root / "data"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_each_row_trains_on_its_own_process_count(name, small_data, tmp_path):
    """`avse train` with the row's settings, scaled down only in size: 3 optimiser steps on 1, 2 or 4 processes (gloo)."""
    (tmp_path / "data").symlink_to(small_data)
    result = run([sys.executable, "-m", "avse.cli", "train", "--params", str(PARAMS), *(f"-S{o}" for o in scaled_down(name))],
                 cwd=tmp_path, timeout=300)
    processes = EXPERIMENTS[name].processes
    assert re.search(rf"{processes} process\(es\) of \d+ thread\(s\), 3 steps of global batch {4 * processes}", result.stderr)
    assert "training done: 3 steps" in result.stderr
    assert (tmp_path / "models" / "best.pt").exists()
