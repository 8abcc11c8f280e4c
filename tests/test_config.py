import os
import re

import pytest
import yaml

from avse import cli
from avse.config import Config, apply_override, load_config
from avse.errors import ConfigError

from conftest import REPO, make_config


def test_params_yaml_is_valid_and_complete():
    config = load_config(REPO / "params.yaml")
    written = yaml.safe_load((REPO / "params.yaml").read_text())
    # Every key of the config appears in params.yaml, so it documents all of them.
    flat_written = Config().flat().keys()
    from avse.config import flatten

    assert set(flatten(written)) == set(flat_written)
    assert config.data.dataset == "synthetic"


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.batch_size=-4", "train.batch_size: -4 is not a positive integer"),
        ("train.batch_size=abc", "train.batch_size: 'abc' is not a positive integer"),
        ("train.batch_size=2.5", "train.batch_size: 2.5 is not a positive integer"),
        ("train.batchsize=4", "train.batchsize: unknown key (did you mean train.batch_size?)"),
        ("data.dataset=imagenet", "data.dataset: 'imagenet' is not one of synthetic, f30k, coco"),
        ("model.keep_ratio=0", "model.keep_ratio: 0.0 is not a number in (0, 1]"),
        ("model.keep_ratio=1.5", "model.keep_ratio: 1.5 is not a number in (0, 1]"),
        ("model.views=0", "model.views: 0 is not an integer >= 1"),
        ("model.block_dim=100", "model.block_dim: 100 does not divide model.embed_size (256)"),
        ("model.size_augment=yes please", "model.size_augment: 'yes please' is not true or false"),
        ("train.lr_decay_epochs=[1, x]", "train.lr_decay_epochs[1]: 'x' is not an integer"),
        ("model.vision=vit", "model.vision: 'vit' is not a section (expected key: value pairs)"),
        ("data.synthetic.min_objects=3", "data.synthetic.min_objects: 3 is not an integer >= 4"),
        ("zzz.key=1", "zzz: unknown key (allowed: data, model, train, embed, eval, tracking)"),
        ("train.batch_size", "override 'train.batch_size': expected key=value"),
    ],
)
def test_bad_values_give_one_line_naming_key_and_value(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "params.yaml", [override])
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def params_command(capsys, *args: str) -> str:
    """`avse params ...`'s stderr with every other parameter at its default, after checking that it exits with status 2."""
    assert cli.main(["params", "--params", os.devnull, *args]) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("train.temperature=.inf", "train.temperature: inf is not a finite number"),  # was a math domain error mid-run
    ("train.lr=1e309", "train.lr: '1e309' is not a finite number"),  # YAML reads it as a string, Python as inf
    ("train.seed=123456789012345678901", "train.seed: 123456789012345678901 is not an integer in [0, 2**64)"),
])
def test_numbers_that_are_not_finite_or_do_not_fit_are_refused(capsys, override, message):
    assert params_command(capsys, "-S", override) == f"error: {message}\n"


def test_a_nul_byte_in_a_parameter_is_refused(capsys):
    assert params_command(capsys, "-S", 'data.images="images\\0x"') == "error: data.images: 'images\\x00x' contains a NUL byte\n"


@pytest.mark.parametrize("name, text, command, message", [
    ("params.yaml", "train:\n  lr: 0.1\nmodel:\n  views: 1\ntrain:\n  seed: 3\n", ["params", "--params"],
     "key 'train' appears twice (lines 1 and 5)"),
    ("experiments.yaml", "experiments:\n  row:\n    set:\n      train.lr: 0.1\n      train.lr: 0.2\n", ["exp", "--list", "--experiments"],
     "key 'train.lr' appears twice (lines 4 and 5)"),
], ids=["params", "experiments"])
def test_a_key_written_twice_in_a_yaml_file_is_refused(tmp_path, capsys, name, text, command, message):
    (tmp_path / name).write_text(text)
    assert cli.main([*command, str(tmp_path / name)]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / name}: not valid YAML: {message}\n"


def test_overrides_parse_yaml_values():
    config = load_config(REPO / "params.yaml", ["train.batch_size=64", "model.vision.name=vit-base", "train.lr=1e-3"])
    assert config.train.batch_size == 64
    assert config.model.vision.name == "vit-base"
    assert config.train.lr == pytest.approx(1e-3)


def test_override_cannot_turn_value_into_section():
    tree = {"train": {"batch_size": 3}}
    with pytest.raises(ConfigError, match="train.batch_size: is a value, not a section"):
        apply_override(tree, "train.batch_size.x=1")


def test_missing_params_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="params.yaml: file not found"):
        load_config(tmp_path / "params.yaml")


def test_hash_depends_on_selected_sections_only():
    base = make_config()
    other_eval = make_config({"eval": {"chunk_size": 7}})
    other_train = make_config({"train": {"lr": 0.1}})
    assert base.hash("train", "model") == other_eval.hash("train", "model")
    assert base.hash("train", "model") != other_train.hash("train", "model")


def test_flat_keys_match_documented_names():
    flat = make_config().flat()
    for key in ("data.dataset", "data.root", "data.img_res", "model.vision.name", "model.vision.init",
                "model.text.name", "model.text.init", "model.embed_size", "model.block_dim", "model.views",
                "model.matching", "train.batch_size", "train.epochs", "train.max_steps",
                "train.nproc_per_node", "train.precision", "tracking.uri", "tracking.experiment"):
        assert key in flat


def test_override_fills_an_empty_section(tmp_path):
    (tmp_path / "params.yaml").write_text("eval:\n")
    assert load_config(tmp_path / "params.yaml", ["eval.protocol=5k"]).eval.protocol == "5k"



def test_the_parameter_reference_page_is_generated_from_params_yaml():
    from avse.reference import parameter_reference

    page = (REPO / "docs" / "parameters.md").read_text(encoding="utf-8")
    assert page == parameter_reference(REPO / "params.yaml"), "docs/parameters.md is stale: avse params --reference > docs/parameters.md"
    assert "| `train.grad_checkpointing` | `false` | recompute each backbone block's activations" in page


@pytest.mark.parametrize("text, message", [
    ("train:\n  lr: 0.1\n", ":2: train.lr has no description"),
    ("train:\n  lr 0.1  # no colon\n", ":2: expected `key: value  # description`"),
    ("train:\n  lr: 0.1  # the rate\n", ": keys of the configuration missing from the file: data.augment.crop"),
])
def test_a_parameter_without_a_description_or_missing_stops_the_reference(tmp_path, text, message):
    from avse.reference import parameter_reference

    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(f"{path}{message}")):
        parameter_reference(path)
