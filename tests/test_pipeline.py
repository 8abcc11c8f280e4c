"""End to end: the real DVC stages on tiny parameters, in a copy of the project."""

import json

import pytest

from conftest import TINY, mlflow_runs, run, set_params


def test_dvc_repro_runs_the_pipeline_and_then_has_nothing_to_do(project):
    set_params(project, TINY | {"train": TINY["train"] | {"nproc_per_node": 2}})
    run(["dvc", "repro"], cwd=project)
    models = project / "models"
    assert sorted(p.name for p in models.iterdir()) == ["best.pt", "last.pt", "run.json", "tokenizer"]
    summary = json.loads((project / "metrics" / "train.json").read_text())
    assert summary["steps"] == 200 // 32 and summary["epochs"] == 1
    # Evaluation outputs: metrics per protocol, plots, per-query results.
    metrics = json.loads((project / "metrics" / "eval.json").read_text())
    keys = {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "i2t_medr", "i2t_meanr", "t2i_medr", "t2i_meanr"}
    assert set(metrics) == {"1k"} and set(metrics["1k"]) == keys
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], cwd=project).stdout)
    assert shown[""]["data"]["metrics/eval.json"]["data"]["1k"]["rsum"] == metrics["1k"]["rsum"]
    assert (project / "metrics" / "recall_curve.csv").read_text().count("\n") == 11
    assert (project / "metrics" / "recall_curve.png").stat().st_size > 1000
    assert (project / "outputs" / "eval" / "t2i.csv").read_text().count("\n") == 51
    assert (project / "outputs" / "eval" / "i2t.csv").read_text().count("\n") == 11
    # One MLflow run although two processes trained; evaluation reported into it.
    runs = mlflow_runs(project)
    assert len(runs) == 1
    assert runs[0].info.run_id == json.loads((models / "run.json").read_text())["run_id"]
    assert runs[0].data.params["train.nproc_per_node"] == "2"
    assert runs[0].data.tags["dataset"] == "synthetic" and "dev_rsum" in runs[0].data.metrics
    diagnostics = {"dev_view_cosine", "dev_block_entropy", "dev_distinct_blocks", "dev_view_share_0", "dev_view_share_1"}
    assert diagnostics <= runs[0].data.metrics.keys()  # AVSE's diagnostics at every dev evaluation
    assert runs[0].data.metrics["dev_view_share_0"] + runs[0].data.metrics["dev_view_share_1"] == pytest.approx(1)
    assert runs[0].data.metrics["test_1k_rsum"] == pytest.approx(metrics["1k"]["rsum"], abs=1e-3)
    prepared = project / "data" / "prepared" / "synthetic"
    stats = json.loads((prepared / "stats.json").read_text())
    assert (stats["train"]["captions"], stats["dev"]["images"], stats["test"]["images"]) == (200, 10, 10)
    assert (prepared / "tokenizer" / "tokenizer.json").exists()
    again = run(["dvc", "repro"], cwd=project)
    assert "didn't change, skipping" in again.stdout
    assert "Running stage" not in again.stdout
    # Embedding and evaluating again gives identical results (deterministic evaluation views).
    before = {name: (project / name).read_bytes() for name in ("metrics/eval.json", "outputs/eval/t2i.csv", "outputs/eval/i2t.csv")}
    run(["python", "-m", "stages.embed"], cwd=project)
    evaluated = run(["python", "-m", "stages.evaluate"], cwd=project)
    assert "rsum" in evaluated.stdout and "1k" in evaluated.stdout  # the printed table
    assert {name: (project / name).read_bytes() for name in before} == before
    # Retrieval from the command line, in both directions.
    found = run(["python", "-m", "avse.cli", "search", "a red circle", "-k", "3", "--out", "grid.png"], cwd=project)
    assert found.stdout.splitlines()[0] == 'top 3 test images for "a red circle":' and len(found.stdout.splitlines()) == 5
    assert (project / "grid.png").read_bytes()[:4] == b"\x89PNG"
    image = next((project / "data" / "synthetic-images").glob("test_*.jpg"))
    found = run(["python", "-m", "avse.cli", "search", "--image", str(image), "-k", "2"], cwd=project)
    assert found.stdout.splitlines()[0] == f"top 2 test captions for {image}:"
    # An edited parameter reruns exactly the stages that read it.
    set_params(project, {"data": {"cache_res": 16}})
    third = run(["dvc", "repro", "prepare"], cwd=project)
    assert "Running stage 'prepare'" in third.stdout and "Running stage 'synthesize'" not in third.stdout


def test_interrupted_training_resumes_from_its_checkpoint(project):
    set_params(project, TINY)
    run(["dvc", "repro", "prepare"], cwd=project)
    train = ["python", "-m", "stages.train", "-S", "train.ckpt_every_steps=1"]
    run(train + ["-S", "train.max_steps=2"], cwd=project)
    first_run = json.loads((project / "models" / "run.json").read_text())["run_id"]
    second = run(train + ["-S", "train.max_steps=5"], cwd=project)
    assert "resuming from models/last.pt at step 2 (epoch 0)" in second.stderr
    assert json.loads((project / "metrics" / "train.json").read_text())["steps"] == 5
    assert json.loads((project / "models" / "run.json").read_text())["run_id"] == first_run
    assert len(mlflow_runs(project)) == 1
    # A finished run whose best.pt was removed (as `dvc repro` does before rerunning) writes it again.
    (project / "models" / "best.pt").unlink()
    third = run(train + ["-S", "train.max_steps=5"], cwd=project)
    assert "resuming from models/last.pt at step 5" in third.stderr
    assert (project / "models" / "best.pt").exists()
    summary = json.loads((project / "metrics" / "train.json").read_text())
    assert summary["steps"] == 5 and summary["final_loss"] is not None
    assert json.loads((project / "metrics" / "train_speed.json").read_text())["pairs_per_s"] > 0
    # The training curve holds each logged step once, across the three sessions.
    curve = (project / "metrics" / "train_curve.csv").read_text().splitlines()
    assert curve[0] == "step,epoch,loss,lr,pairs_per_s,dev_rsum,dev_view_cosine,dev_block_entropy,dev_distinct_blocks"
    rows = [line.split(",") for line in curve[1:]]
    assert [int(row[0]) for row in rows if row[2]] == [2, 4] and [int(row[0]) for row in rows if row[5]] == [2, 5]
    # Each dev evaluation carries AVSE's diagnostics: a cosine, at most log2(4 image blocks) bits, 1 to 2 blocks (2 text blocks).
    for row in (row for row in rows if row[5]):
        assert -1 <= float(row[6]) <= 1 and 0 <= float(row[7]) <= 2 and 1 <= float(row[8]) <= 2


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
