"""What a tracked run says about itself: names, source tags, dataset inputs; the training curve; registry choices."""

import json

import pandas as pd
import pytest

from avse.config import from_dict
from avse.registry import best_runs, registered_name
from avse.run_info import dvc_data_digest, reference_params, run_name, run_tags, split_inputs
from avse.training.curve import TrainingCurve

from conftest import REPO


def test_a_run_is_named_by_its_dvc_experiment_or_by_what_differs_from_the_reference_params():
    reference = from_dict({}).flat()
    config = from_dict({"model": {"views": 1, "block_dim": 256}})
    assert run_name(config, reference, experiment="vse-1view-2") == "synthetic-vit-tiny-p16-vse-1view-2"
    assert run_name(config, reference, experiment="") == "synthetic-vit-tiny-p16-block_dim256-views1"
    assert run_name(from_dict({}), reference, experiment="") == "synthetic-vit-tiny-p16"
    hub = from_dict({"model": {"vision": {"name": "google/vit-base-patch16-384"}}, "data": {"img_res": 384}})
    assert run_name(hub, reference, experiment="") == "synthetic-vit-base-patch16-384-img_res384-namevit-base-patch16-384"
    many = from_dict({"train": {"lr": 0.1, "seed": 3, "epochs": 9, "batch_size": 8, "warmup_steps": 1, "weight_decay": 0.0, "grad_clip": 1.0}})
    assert run_name(many, reference, experiment="") == "synthetic-vit-tiny-p16-seed3-batch_size8-epochs9-lr0.1-weight_decay0.0-warmup_steps1-+1"
    # The tracking section never names a run.
    assert run_name(from_dict({"tracking": {"experiment": "other"}}), reference, experiment="") == "synthetic-vit-tiny-p16"


def test_reference_params_are_the_committed_params_validated():
    reference = reference_params(REPO / "params.yaml")
    assert reference["train.seed"] == 0 and reference["data.dataset"] == "synthetic" and isinstance(reference["train.lr"], float)


def test_run_tags_fill_mlflows_source_columns_and_the_data_version(tmp_path, monkeypatch):
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  prepare:\n    outs:\n    - path: data/prepared/synthetic\n      md5: 0123abcd.dir\n")
    assert dvc_data_digest("synthetic", tmp_path / "dvc.lock") == "0123abcd.dir"
    assert dvc_data_digest("f30k", tmp_path / "dvc.lock") == "" and dvc_data_digest("f30k", tmp_path / "absent.lock") == ""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("DVC_EXP_NAME", "avse-2")
    tags = run_tags(from_dict({}))
    assert tags["mlflow.source.name"] == "stages/train.py" and tags["mlflow.source.type"] == "LOCAL"
    assert len(tags["mlflow.source.git.commit"]) == 40 and tags["mlflow.source.git.commit"] == tags["git_commit"]
    assert tags["dvc_experiment"] == "avse-2"


def test_split_inputs_name_digest_and_count_the_prepared_splits(tmp_path):
    for split, rows in (("train", 3), ("dev", 2), ("test", 2)):
        pd.DataFrame({"image_id": range(rows), "caption": [f"{split} {i}" for i in range(rows)]}).to_csv(tmp_path / f"{split}.csv", index=False)
    (tmp_path / "stats.json").write_text(json.dumps({s: {"images": n, "captions": 5 * n} for s, n in (("train", 3), ("dev", 2), ("test", 2))}))
    inputs = split_inputs(from_dict({"data": {"dataset": "f30k"}}), tmp_path)
    assert [(i.name, i.context, i.images, i.captions) for i in inputs] == [
        ("f30k-train", "training", 3, 15), ("f30k-dev", "evaluation", 2, 10), ("f30k-test", "evaluation", 2, 10)]
    assert len({i.digest for i in inputs}) == 3 and all(len(i.digest) == 16 for i in inputs)
    (tmp_path / "train.csv").write_text("image_id,caption\n0,other\n")
    assert split_inputs(from_dict({}), tmp_path)[0].digest != inputs[0].digest


def test_training_curve_writes_one_row_per_step_and_kind_reads_back_and_renders(tmp_path):
    curve = TrainingCurve()
    for step in (2, 4, 6):
        curve.add(step, 0, loss=1.0 / step, lr=0.001, pairs_per_s=100.0)
    curve.add(6, 1, dev_rsum=12.5, dev_view_cosine=0.5, dev_block_entropy=1.25, dev_distinct_blocks=1.5)
    curve.add(6, 1, dev_rsum=13.0, dev_view_cosine=0.5, dev_block_entropy=1.25, dev_distinct_blocks=1.5)  # evaluated again after a resume
    curve.write(tmp_path / "curve.csv")
    assert (tmp_path / "curve.csv").read_text().splitlines() == [
        "step,epoch,loss,lr,pairs_per_s,dev_rsum,dev_view_cosine,dev_block_entropy,dev_distinct_blocks",
        "2,0,0.5,0.001,100,,,,", "4,0,0.25,0.001,100,,,,", "6,0,0.166667,0.001,100,,,,", "6,1,,,,13,0.5,1.25,1.5"]
    assert TrainingCurve.load(tmp_path / "curve.csv").rows[2:] == [
        {"step": 6, "epoch": 0, "loss": 0.166667, "lr": 0.001, "pairs_per_s": 100},
        {"step": 6, "epoch": 1, "dev_rsum": 13, "dev_view_cosine": 0.5, "dev_block_entropy": 1.25, "dev_distinct_blocks": 1.5}]
    curve.render(tmp_path / "curve.png", title="run")
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"


def test_the_champion_is_the_best_finished_run_of_each_dataset_backbone_and_resolution():
    table = pd.DataFrame([
        {"run_id": "a", "status": "FINISHED", "dataset": "f30k", "backbone": "vit", "resolution": 224, "rsum": 400.0, "start_time": 1},
        {"run_id": "b", "status": "FINISHED", "dataset": "f30k", "backbone": "vit", "resolution": 224, "rsum": 410.0, "start_time": 2},
        {"run_id": "c", "status": "KILLED", "dataset": "f30k", "backbone": "vit", "resolution": 224, "rsum": 500.0, "start_time": 3},
        {"run_id": "d", "status": "FINISHED", "dataset": "f30k", "backbone": "vit", "resolution": 384, "rsum": 300.0, "start_time": 4},
        {"run_id": "e", "status": "FINISHED", "dataset": "f30k", "backbone": "vit", "resolution": 384, "rsum": None, "start_time": 5},
    ])
    assert sorted(best_runs(table)["run_id"]) == ["b", "d"]
    assert registered_name("f30k", "google/vit-base-patch16-224-in21k", 224) == "avse-f30k-vit-base-patch16-224-in21k-224"
    assert registered_name("coco", "microsoft/swin_base", 384.0) == "avse-coco-swin-base-384"


@pytest.mark.parametrize("columns", [["text"], ["caption", "image"]])
def test_the_pyfunc_wants_one_kind_of_input(columns):
    from avse.errors import AvseError
    from avse.serving import EmbeddingModel

    with pytest.raises(AvseError, match=r"predict: give a frame with a 'caption' or an 'image' column, got columns"):
        EmbeddingModel().predict(None, pd.DataFrame({c: ["x"] for c in columns}))
