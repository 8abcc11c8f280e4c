"""End to end: the real DVC stages on tiny parameters, in a copy of the project."""

import json

import yaml

from conftest import run

TINY = {
    "data": {"synthetic": {"train_images": 40, "dev_images": 10, "test_images": 10}, "num_workers": 0},
}


def set_params(project, tree):
    params = yaml.safe_load((project / "params.yaml").read_text())
    for section, values in tree.items():
        _merge(params.setdefault(section, {}), values)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _merge(target, values):
    for key, value in values.items():
        if isinstance(value, dict):
            _merge(target.setdefault(key, {}), value)
        else:
            target[key] = value


def test_dvc_repro_builds_the_dataset_and_then_has_nothing_to_do(project):
    set_params(project, TINY)
    run(["dvc", "repro"], cwd=project)
    prepared = project / "data" / "prepared" / "synthetic"
    stats = json.loads((prepared / "stats.json").read_text())
    assert (stats["train"]["captions"], stats["dev"]["images"], stats["test"]["images"]) == (200, 10, 10)
    assert (prepared / "tokenizer" / "tokenizer.json").exists()
    again = run(["dvc", "repro"], cwd=project)
    assert "didn't change, skipping" in again.stdout
    assert "Running stage" not in again.stdout
    # An edited parameter reruns exactly the stages that read it.
    set_params(project, {"data": {"cache_res": 32}})
    third = run(["dvc", "repro"], cwd=project)
    assert "Running stage 'prepare'" in third.stdout and "Running stage 'synthesize'" not in third.stdout


def test_bad_params_stop_the_stage_with_one_line(project):
    set_params(project, {"train": {"batch_size": -4}})
    result = run(["python", "-m", "stages.prepare"], cwd=project, check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: train.batch_size: -4 is not a positive integer"
    assert not (project / "data" / "prepared").exists()


def test_cli_overrides_use_dvc_syntax(project):
    result = run(["python", "-m", "avse.cli", "params", "-S", "train.batch_size=64", "-S", "model.views=1"], cwd=project)
    assert "train.batch_size: 64" in result.stdout and "model.views: 1" in result.stdout
    bad = run(["python", "-m", "avse.cli", "params", "-S", "model.block_dim=100"], cwd=project, check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip() == "error: model.block_dim: 100 does not divide model.embed_size (256)"
