"""`avse compare` over runs in a real (SQLite) MLflow store, and against stores it cannot read."""

import shutil
import time

import pandas as pd
import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from avse import cli
from avse.analysis.compare import COLUMNS, SUMMARY_COLUMNS, comparison_table, load_runs, seed_summary, summary_for_reading, write_comparison
from avse.errors import AvseError

from conftest import REPO, free_port


def log_run(client, experiment_id, name, params, tags, metrics, status="FINISHED"):
    run_id = client.create_run(experiment_id, run_name=name).info.run_id
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()],
                     tags=[RunTag(k, v) for k, v in tags.items()],
                     metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()])
    client.set_terminated(run_id, status=status)
    return run_id


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("avse", artifact_location=str(tmp_path / "artifacts"))
    avse = log_run(client, experiment_id, "avse",
                   {"data.img_res": 224, "model.views": 2, "model.block_dim": 256, "model.matching": "max", "train.epochs": 25},
                   {"dataset": "f30k", "backbone": "google/vit-base-patch16-224-in21k", "dvc_experiment": "vit-224"},
                   {"test_1k_rsum": 480.5, "test_1k_i2t_r1": 70.1, "test_1k_t2i_r1": 52.3, "train_seconds": 3600.0, "pairs_per_s": 410.0})
    baseline = log_run(client, experiment_id, "baseline",
                       {"data.img_res": 384, "model.views": 1, "model.block_dim": 1024, "model.matching": "max", "train.epochs": 25},
                       {"dataset": "coco", "backbone": "microsoft/swin-base-patch4-window12-384-in22k"},
                       {"testall_5fold1k_rsum": 500.0, "testall_5k_rsum": 400.0, "testall_5fold1k_t2i_r1": 60.0,
                        "testall_eccv_i2t_map_at_r": 41.5, "testall_cxc_t2i_r1": 55.25}, status="KILLED")
    return uri, avse, baseline


def test_one_correct_row_per_run(store, tmp_path):
    uri, avse, baseline = store
    table = comparison_table(load_runs(uri, "avse"))
    assert list(table.columns) == COLUMNS and len(table) == 2
    rows = table.set_index("run_id")
    assert rows.loc[avse, ["dataset", "resolution", "views", "block_dim", "protocol", "rsum", "i2t_r1", "pairs_per_s", "dvc_experiment"]].tolist() == [
        "f30k", 224, 2, 256, "1k", 480.5, 70.1, 410.0, "vit-224"]
    # COCO reports its 5-fold 1K result, the first protocol in order of preference.
    assert rows.loc[baseline, ["protocol", "rsum", "t2i_r1", "views"]].tolist() == ["5fold1k", 500.0, 60.0, 1]
    # COCO's 5K test also has ECCV Caption and CxC; Flickr30K has neither.
    assert rows.loc[baseline, ["eccv_i2t_map_at_r", "cxc_t2i_r1"]].tolist() == [41.5, 55.25]
    assert rows.loc[avse, ["eccv_i2t_map_at_r", "cxc_t2i_r1"]].isna().all()
    shown = summary_for_reading(seed_summary(table))
    assert shown["eccv_i2t_map_at_r"].tolist() == ["41.5", ""] or shown["eccv_i2t_map_at_r"].tolist() == ["", "41.5"]
    assert "eccv_t2i_r1" not in shown  # a metric no experiment has is left out of the readable table
    # An interrupted run is listed, and says so.
    assert rows.loc[baseline, "status"] == "KILLED" and rows.loc[avse, "status"] == "FINISHED"
    assert pd.isna(rows.loc[baseline, "train_seconds"]) and pd.isna(rows.loc[baseline, "dvc_experiment"])
    # The two runs differ in every setting they logged, so each is its own experiment.
    assert rows.loc[avse, "differs"] == "data.img_res=224 model.block_dim=256 model.views=2"
    assert rows.loc[avse, "experiment"] != rows.loc[baseline, "experiment"]


def log_seeds(client, experiment_id, params, rsums, **other):
    for seed, rsum in enumerate(rsums):
        log_run(client, experiment_id, f"seed{seed}", params | {"train.seed": seed} | other,
                {"dataset": "synthetic", "backbone": "vit-tiny"}, {"test_1k_rsum": rsum, "test_1k_i2t_r1": rsum / 10, "pairs_per_s": 100.0 + seed})


def test_runs_that_differ_only_in_the_seed_are_one_experiment_with_mean_and_sd(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("avse", artifact_location=str(tmp_path / "artifacts"))
    avse = {"model.views": 2, "model.block_dim": 64, "train.lr": 0.001}
    log_seeds(client, experiment_id, avse, [30.0, 33.0, 36.0])
    # How a run is observed or tracked does not make it another experiment ...
    log_run(client, experiment_id, "observed", avse | {"train.seed": 3, "train.log_every": 5, "data.num_workers": 0, "tracking.experiment": "x"},
            {"dataset": "synthetic"}, {"test_1k_rsum": 39.0, "test_1k_i2t_r1": 3.9})
    # ... but any other parameter does, the learning rate as much as the views.
    log_seeds(client, experiment_id, avse | {"model.views": 1, "model.block_dim": 256}, [20.0, 24.0])
    log_seeds(client, experiment_id, avse | {"train.lr": 0.002}, [50.0])
    summary = seed_summary(comparison_table(load_runs(uri, "avse")))
    assert list(summary.columns) == SUMMARY_COLUMNS and len(summary) == 3
    rows = summary.set_index("differs")
    two_views = rows.loc["model.block_dim=64 model.views=2 train.lr=0.001"]
    assert (two_views["n"], two_views["seeds"]) == (4, "0,1,2,3")
    assert two_views["rsum_mean"] == pytest.approx(34.5) and two_views["rsum_sd"] == pytest.approx(3.872983, rel=1e-6)
    assert two_views["i2t_r1_mean"] == pytest.approx(3.45) and two_views["pairs_per_s"] == pytest.approx(101.0)
    one_view = rows.loc["model.block_dim=256 model.views=1 train.lr=0.001"]
    assert (one_view["n"], one_view["rsum_mean"], one_view["rsum_sd"]) == (2, 22.0, pytest.approx(2.828427, rel=1e-6))
    single = rows.loc["model.block_dim=64 model.views=2 train.lr=0.002"]
    assert single["n"] == 1 and single["rsum_mean"] == 50.0 and pd.isna(single["rsum_sd"])
    assert summary_for_reading(summary).set_index("differs")["rsum"].to_dict() == {
        "model.block_dim=64 model.views=2 train.lr=0.001": "34.5 ± 3.9",
        "model.block_dim=256 model.views=1 train.lr=0.001": "22.0 ± 2.8",
        "model.block_dim=64 model.views=2 train.lr=0.002": "50.0",
    }


def test_written_comparison_has_one_row_per_experiment_and_every_run(store, tmp_path):
    uri, _, _ = store
    table = comparison_table(load_runs(uri, "avse"))
    paths = write_comparison(table, tmp_path / "out")
    assert [p.name for p in paths] == ["comparison.csv", "comparison.md", "comparison.png", "comparison_runs.csv"]
    assert pd.read_csv(paths[0]).shape == (2, len(SUMMARY_COLUMNS))
    assert pd.read_csv(paths[3]).shape == (2, len(COLUMNS))
    markdown = paths[1].read_text().splitlines()
    assert markdown[0].startswith("| experiment | differs | dataset | backbone |") and len(markdown) == 4
    # One run: the mean alone, no sd; the COCO run's ECCV Caption and CxC columns are empty for the Flickr30K one.
    assert markdown[0].endswith("| rsum | eccv_i2t_map_at_r | cxc_t2i_r1 | pairs_per_s |")
    assert markdown[3].endswith("| 224 | 2 | 256 | max | 25 | 1k | 1 |  | 70.1 |  |  | 52.3 |  |  | 480.5 |  |  | 410.0 |")
    assert paths[2].read_bytes()[:4] == b"\x89PNG"


def test_filters(store):
    uri, avse, _ = store
    assert load_runs(uri, "avse", dataset="f30k")["run_id"].tolist() == [avse]
    assert load_runs(uri, "avse", since="2999-01-01").empty
    with pytest.raises(AvseError, match="--since: 'yesterday' is not a date"):
        load_runs(uri, "avse", since="yesterday")
    with pytest.raises(AvseError, match="no experiment 'other'"):
        load_runs(uri, "other")


def compare_command(tmp_path, monkeypatch, capsys, *options: str) -> tuple[int, str]:
    """`avse compare` in a project at `tmp_path`: (exit status, stderr)."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    status = cli.main(["compare", "--out", str(tmp_path / "out"), *options])
    return status, capsys.readouterr().err


def test_a_corrupt_store_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "mlflow.db").write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 16)
    status, err = compare_command(tmp_path, monkeypatch, capsys)
    assert (status, err) == (2, f"error: sqlite:///{tmp_path / 'mlflow.db'}: cannot read the tracking store "
                                "((sqlite3.DatabaseError) file is not a database)\n")
    assert not (tmp_path / "out").exists()


def test_a_dataset_with_quotes_is_searched_for_not_parsed(store):
    uri, _, _ = store
    assert load_runs(uri, "avse", dataset="f30k' or x").empty
    assert load_runs(uri, "avse", dataset='f30k" or x').empty
    with pytest.raises(AvseError, match=r"^--dataset: 'it\\'s \"x\"' holds both kinds of quote, which MLflow's search cannot match$"):
        load_runs(uri, "avse", dataset="it's \"x\"")


def test_a_tracking_server_that_does_not_answer_is_one_line_at_once(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)  # what the command sets unless the user did
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    started = time.monotonic()
    status, err = compare_command(tmp_path, monkeypatch, capsys, "-S", f"tracking.uri=http://127.0.0.1:{free_port()}")
    assert time.monotonic() - started < 20  # not MLflow's four minutes of retries
    assert status == 2 and err.count("\n") == 1
    assert err.startswith("error: http://127.0.0.1:") and "Connection refused" in err
    assert err.endswith("; MLflow gave up at MLFLOW_HTTP_REQUEST_MAX_RETRIES=1 and MLFLOW_HTTP_REQUEST_TIMEOUT=2 (seconds for each answer): "
                        "raise them to wait longer\n")
