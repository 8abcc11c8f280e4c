"""Tracking against a real `mlflow server` on 127.0.0.1, including the server going away mid-run."""

import json
import shutil
import sys
import time
from pathlib import Path

import pytest

from avse import cli, tracking
from avse.config import TrackingConfig
from avse.tracking import Tracker, sync_unsent
from conftest import REPO, TINY, Server, free_port, mlflow_client, run, set_params


def mlflow_server(root: Path, port: int) -> list[str]:
    return [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--default-artifact-root", str(root / "artifacts")]


@pytest.fixture
def server(tmp_path):
    port = free_port()
    server = Server(mlflow_server(tmp_path, port), port)
    server.root = tmp_path
    server.start()
    yield server
    server.stop()


def history(server, run_id, key):
    return [(m["step"], m["value"]) for m in server.get(f"metrics/get-history?run_id={run_id}&metric_key={key}")["metrics"]]


def test_run_read_back_over_rest(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tracking, "SYSTEM_METRICS_SECONDS", 0.5)
    tracker = Tracker(TrackingConfig(uri=server.uri, experiment="avse"))
    run_id = tracker.start(None, "run", {"train.batch_size": 128, "model.views": 2}, {"dataset": "synthetic"}, system_metrics=True)
    for step in (10, 20):
        tracker.log_metrics({"loss": 1.0 / step}, step)
    (tmp_path / "best.pt").write_bytes(b"weights")
    tracker.log_artifact(tmp_path / "best.pt", "checkpoints")
    tracker.log_metrics({"test_1k_rsum": 123.0}, 0)
    time.sleep(2)  # a few system metric samples
    tracker.finish()
    run = server.get(f"runs/get?run_id={run_id}")["run"]
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params == {"train.batch_size": "128", "model.views": "2"}
    assert {t["key"]: t["value"] for t in run["data"]["tags"]}["dataset"] == "synthetic"
    assert run["info"]["status"] == "FINISHED"
    assert history(server, run_id, "loss") == [(10, 0.1), (20, 0.05)]
    assert history(server, run_id, "test_1k_rsum") == [(0, 123.0)]
    assert "system/cpu_utilization_percentage" in {m["key"] for m in run["data"]["metrics"]}
    assert (tmp_path / "artifacts").rglob("best.pt").__next__().read_bytes() == b"weights"


def test_server_down_mid_run_metrics_arrive_after_restart(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tracking, "RETRY_SECONDS", 0.0)
    tracker = Tracker(TrackingConfig(uri=server.uri, experiment="avse"))
    run_id = tracker.start(None, "run", {}, {})
    tracker.log_metrics({"loss": 3.0}, 1)
    server.stop()
    tracker.log_metrics({"loss": 2.0}, 2)  # fails: queued, training goes on
    assert len(tracker._pending) == 1
    server.start()
    tracker.log_metrics({"loss": 1.0}, 3)  # the store answers again: the queue is sent first
    tracker.finish()
    assert history(server, run_id, "loss") == [(1, 3.0), (2, 2.0), (3, 1.0)]
    assert not (tmp_path / "metrics" / "untracked.jsonl").exists()


def test_server_gone_until_the_end_keeps_metrics_for_a_later_sync(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tracker = Tracker(TrackingConfig(uri=server.uri, experiment="avse"))
    run_id = tracker.start(None, "run", {}, {})
    server.stop()
    tracker.log_metrics({"loss": 2.0}, 5)
    tracker.log_metrics({"loss": 1.0}, 6)
    tracker.finish()
    kept = (tmp_path / "metrics" / "untracked.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in kept] == [5, 6]
    server.start()
    assert sync_unsent(tmp_path / "metrics" / "untracked.jsonl") == 2
    assert history(server, run_id, "loss") == [(5, 2.0), (6, 1.0)]
    assert not (tmp_path / "metrics" / "untracked.jsonl").exists()


def test_a_relative_sqlite_store_is_anchored_at_the_project_a_queued_experiment_runs_for(tmp_path, monkeypatch):
    # `dvc exp run --queue` runs in a temporary copy and names the project in DVC_ROOT.
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "project"))
    assert tracking.store_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path / 'project' / 'mlflow.db'}"
    # A notebook names the project it reads, which wins over DVC_ROOT.
    assert tracking.store_uri("sqlite:///mlflow.db", root=tmp_path / "other") == f"sqlite:///{tmp_path / 'other' / 'mlflow.db'}"
    assert tracking.store_uri("sqlite:////srv/mlflow.db") == "sqlite:////srv/mlflow.db"
    assert tracking.store_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    monkeypatch.delenv("DVC_ROOT")
    monkeypatch.chdir(tmp_path)
    assert tracking.store_uri("sqlite:///runs/mlflow.db") == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert tracking.artifact_root(f"sqlite:///{tmp_path / 'mlflow.db'}") == (tmp_path / "mlruns").as_uri()
    assert tracking.artifact_root("http://127.0.0.1:5000") is None


def test_a_run_the_store_never_saw_is_created_by_the_later_sync(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    server.stop()
    tracker = Tracker(TrackingConfig(uri=server.uri, experiment="avse"))
    assert tracker.start(None, "offline-run", {"model.views": 2}, {"dataset": "synthetic"}) is None
    tracker.log_metrics({"loss": 2.0}, 5)
    tracker.log_metrics({"loss": 1.0}, 6)
    tracker.finish()
    server.start()
    assert sync_unsent(tmp_path / "metrics" / "untracked.jsonl") == 2
    runs = server.post("runs/search", {"experiment_ids": [server.get("experiments/get-by-name?experiment_name=avse")["experiment"]["experiment_id"]]})["runs"]
    assert [r["info"]["run_name"] for r in runs] == ["offline-run"]
    run = runs[0]
    assert {p["key"]: p["value"] for p in run["data"]["params"]} == {"model.views": "2"}
    assert run["info"]["status"] == "FINISHED"
    assert history(server, run["info"]["run_id"], "loss") == [(5, 2.0), (6, 1.0)]
    assert not (tmp_path / "metrics" / "untracked.jsonl").exists()


def test_a_failed_sync_keeps_exactly_what_was_not_sent(tmp_path):
    unsent = tmp_path / "untracked.jsonl"
    record = {"tracking_uri": "http://127.0.0.1:9", "run_id": "abc", "metrics": {"loss": 1.0}, "step": 1, "timestamp": 0}
    unsent.write_text(json.dumps(record) + "\n")
    with pytest.raises(tracking.AvseError, match=r"could not send metrics of run abc .*0 records sent, the rest kept in"):
        sync_unsent(unsent)
    assert json.loads(unsent.read_text()) == record


def test_a_pipeline_run_logged_to_a_server_reads_back_over_rest(server, project):
    # fp32 everywhere, so that the pipeline's embeddings and the served model's are the same numbers.
    set_params(project, TINY | {"train": TINY["train"] | {"precision": "fp32"}, "tracking": {"uri": server.uri, "experiment": "avse"}})
    run(["dvc", "repro"], cwd=project)
    found = server.get("experiments/get-by-name?experiment_name=avse")["experiment"]
    experiment = found["experiment_id"]
    # The UI opens the experiment on its runs table (the model-training layout), not on the GenAI overview.
    assert {"key": "mlflow.experimentKind", "value": "custom_model_development"} in found["tags"]
    (found,) = server.post("runs/search", {"experiment_ids": [experiment]})["runs"]
    run_id = found["info"]["run_id"]
    assert run_id == json.loads((project / "models" / "run.json").read_text())["run_id"]
    params = {p["key"]: p["value"] for p in found["data"]["params"]}
    assert (params["train.batch_size"], params["model.embed_size"], params["data.img_res"]) == ("16", "32", "32")
    assert {t["key"]: t["value"] for t in found["data"]["tags"]}["dataset"] == "synthetic"
    assert [step for step, _ in history(server, run_id, "loss")] == [2, 4, 6, 8, 10, 12]  # every train.log_every steps
    evaluated = json.loads((project / "metrics" / "eval.json").read_text())["1k"]["rsum"]
    assert history(server, run_id, "test_1k_rsum") == [(0, pytest.approx(evaluated, abs=1e-3))]
    artifacts = server.get(f"artifacts/list?run_id={run_id}&path=checkpoints")["files"]
    assert [(a["path"], a["file_size"] > 0) for a in artifacts] == [("checkpoints/best.pt", True)]
    # What the runs table shows: name, source, datasets, model.
    assert found["info"]["run_name"] == "synthetic-vit-tiny"
    tags = {t["key"]: t["value"] for t in found["data"]["tags"]}
    assert (tags["mlflow.source.name"], tags["mlflow.source.type"]) == ("stages/train.py", "LOCAL")
    assert tags["dvc_data_md5"].endswith(".dir")
    inputs = [(d["dataset"]["name"], {t["key"]: t["value"] for t in d["tags"]}) for d in found["inputs"]["dataset_inputs"]]
    assert inputs == [
        ("synthetic-train", {"mlflow.data.context": "training", "images": "40", "captions": "200"}),
        ("synthetic-dev", {"mlflow.data.context": "evaluation", "images": "10", "captions": "50"}),
        ("synthetic-test", {"mlflow.data.context": "evaluation", "images": "10", "captions": "50"}),
    ]
    model_id = json.loads((project / "models" / "run.json").read_text())["model_id"]
    assert [output["model_id"] for output in found["outputs"]["model_outputs"]] == [model_id]
    from mlflow.tracking import MlflowClient

    logged = MlflowClient(server.uri).get_logged_model(model_id)
    linked = {(m.key, m.dataset_name) for m in logged.metrics}
    assert {("test_1k_rsum", "synthetic-test"), ("best_dev_rsum", "synthetic-dev")} <= linked

    # The best run registered, then loaded in a fresh process: it ranks an image's captions as `avse search` does.
    registered = run(["python", "-m", "avse.cli", "register"], cwd=project).stdout
    assert registered == f"registered  models:/avse-synthetic-vit-tiny-32@champion = version 1 (run {run_id}, test rsum {evaluated:.1f})\n"
    assert run(["python", "-m", "avse.cli", "register"], cwd=project).stdout.startswith("unchanged   models:/avse-synthetic-vit-tiny-32@champion = version 1")
    image = next((project / "data" / "synthetic-images").glob("test_*.jpg"))
    ranking = ("import sys, mlflow, pandas, torch; model = mlflow.pyfunc.load_model(sys.argv[1]); "
               "captions = pandas.read_csv('data/prepared/synthetic/test.csv', keep_default_na=False)['caption'].tolist(); "
               "cap = model.predict(pandas.DataFrame({'caption': captions})); img = model.predict(pandas.DataFrame({'image': [open(sys.argv[2], 'rb').read()]})); "
               "scores = model.unwrap_python_model().similarity(torch.tensor(img['embedding'].tolist()), torch.tensor(cap['embedding'].tolist()))[0]; "
               "top = scores.topk(5); print('\\n'.join(f'{s:.4f} {captions[j]}' for s, j in zip(top.values.tolist(), top.indices.tolist())))")
    served = run([sys.executable, "-c", ranking, "models:/avse-synthetic-vit-tiny-32@champion", str(image)], cwd=project,
                 env={"MLFLOW_TRACKING_URI": server.uri}).stdout.splitlines()
    for command in (["search", "--image", str(image), "-k", "5"],
                    ["search", "--model", "models:/avse-synthetic-vit-tiny-32@champion", "--image", str(image), "-k", "5"]):
        searched = run(["python", "-m", "avse.cli", *command], cwd=project).stdout.splitlines()[1:]
        assert len(searched) == len(served) == 5
        for line, expected in zip(searched, served):
            rank, score, caption = line.split(maxsplit=2)
            assert float(score) == pytest.approx(float(expected.split()[0]), abs=2e-4)
        assert sorted(line.split(maxsplit=2)[2] for line in searched) == sorted(e.split(maxsplit=1)[1] for e in served)

    # `make ui` on the same store, on a free port, shows the run's name, datasets, source and model.
    environment = Path(sys.prefix)
    if not (environment / ".installed").exists():
        return  # `make ui` runs in the environment that `make install` sets up
    server.stop()
    port = free_port()
    ui = Server(["make", "-C", str(REPO), "ui", f"VENV={environment}", f"UI_PORT={port}", f"UI_STORE=sqlite:///{server.root / 'mlflow.db'}"], port)
    ui.start()
    try:
        shown = ui.get(f"runs/get?run_id={run_id}")["run"]
    finally:
        ui.stop()
    assert shown["info"]["run_name"] == "synthetic-vit-tiny"
    assert [d["dataset"]["name"] for d in shown["inputs"]["dataset_inputs"]] == ["synthetic-train", "synthetic-dev", "synthetic-test"]
    assert {t["key"]: t["value"] for t in shown["data"]["tags"]}["mlflow.source.name"] == "stages/train.py"
    assert [o["model_id"] for o in shown["outputs"]["model_outputs"]] == [model_id]


def test_metrics_a_queued_experiment_could_not_send_are_kept_in_the_project_not_in_its_temporary_copy(tmp_path, monkeypatch):
    copy, project = tmp_path / "copy", tmp_path / "project"
    copy.mkdir()
    monkeypatch.chdir(copy)
    monkeypatch.setenv("DVC_ROOT", str(project))  # what `dvc exp run --queue` sets
    tracker = Tracker(TrackingConfig(uri=f"http://127.0.0.1:{free_port()}", experiment="avse"))
    assert tracker.start(None, "run", {}, {}) is None
    tracker.log_metrics({"loss": 1.0}, 1)
    tracker.finish()
    assert not (copy / "metrics").exists()
    kept = [json.loads(line) for line in (project / "metrics" / "untracked.jsonl").read_text().splitlines()]
    assert [record.get("step") for record in kept] == [None, 1]  # the run record, then the metrics



def test_experiments_are_tagged_for_the_model_training_layout(tmp_path):
    """New experiments, and existing ones without a kind, open on the runs table; a kind someone chose stays."""
    from mlflow.tracking import MlflowClient

    from avse.tracking import open_run_in

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    client.create_experiment("untagged")
    client.create_experiment("genai", tags={"mlflow.experimentKind": "genai_development"})
    for name in ("new", "untagged", "genai"):
        open_run_in(client, name, uri, None, "run", {}, {})
    kinds = {name: client.get_experiment_by_name(name).tags.get("mlflow.experimentKind") for name in ("new", "untagged", "genai")}
    assert kinds == {"new": "custom_model_development", "untagged": "custom_model_development", "genai": "genai_development"}


def test_the_ui_address_opens_the_experiments_runs_table(tmp_path):
    """MLflow 3's UI opens an experiment on its GenAI overview unless the address asks for model training."""
    from mlflow.tracking import MlflowClient

    from avse.tracking import runs_table_url

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert runs_table_url(store, "avse", "127.0.0.1", 5000) == "http://127.0.0.1:5000/#/experiments?workflowType=machine_learning"
    experiment_id = MlflowClient(tracking_uri=store).create_experiment("avse")
    assert runs_table_url(store, "avse", "127.0.0.1", 5000) == f"http://127.0.0.1:5000/#/experiments/{experiment_id}?workflowType=machine_learning"


def test_a_sync_file_whose_last_line_was_cut_is_one_line_and_sends_nothing(tmp_path, monkeypatch, capsys):
    unsent = tmp_path / "untracked.jsonl"
    record = {"tracking_uri": f"http://127.0.0.1:{free_port()}", "run_id": "abc", "metrics": {"loss": 1.0}, "step": 1, "timestamp": 0}
    text = json.dumps(record) + "\n" + json.dumps(record | {"step": 2})[:40]  # the writer was killed mid-line
    unsent.write_text(text)
    assert cli.main(["tracking-sync", str(unsent)]) == 2
    assert capsys.readouterr().err == (f"error: {unsent}:2: not a metric record (Unterminated string starting at, column 18); a line "
                                       "cut short when its writer was killed holds nothing to send: remove it and sync again\n")
    assert unsent.read_text() == text


def test_a_copied_project_logs_artifacts_beside_its_own_store(tmp_path, monkeypatch):
    original, copy = tmp_path / "original", tmp_path / "copy"
    original.mkdir()
    monkeypatch.chdir(original)
    config = TrackingConfig(uri="sqlite:///mlflow.db", experiment="avse")
    tracker = Tracker(config)
    run_id = tracker.start(None, "run", {}, {})
    (original / "eval.json").write_text("the original's")
    tracker.log_artifact(original / "eval.json", "evaluation")
    tracker.finish()
    shutil.copytree(original, copy)
    monkeypatch.chdir(copy)
    (copy / "eval.json").write_text("the copy's")
    tracker = Tracker(config)
    new_run = tracker.start(None, "run", {}, {})
    tracker.log_artifact(copy / "eval.json", "evaluation")
    tracker.finish()
    assert [p.read_text() for p in (original / "mlruns").rglob("eval.json")] == ["the original's"]
    assert [p.read_text() for p in (copy / "mlruns" / new_run).rglob("eval.json")] == ["the copy's"]
    # The copied run follows too: a later stage reporting into it logs beside the copy.
    assert mlflow_client(copy).get_run(run_id).info.artifact_uri == (copy / "mlruns" / run_id / "artifacts").as_uri()
