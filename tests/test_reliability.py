"""Failures end to end, on a tiny prepared project: a killed train stage, a dying rank, a diverging run,
a full disk while embedding, and wrong parameters. Each one resumes, or stops with one line and intact outputs."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from avse import cli
from avse.checkpoint import load_checkpoint

from conftest import REPO, TINY, command_env, copy_project, fill_disk_after, mlflow_client, mlflow_runs, run, set_params

STEPS_PER_EPOCH = 200 // 16  # TINY: 200 training captions, global batch 16
# One thread per training process: on a few shared cores torch's default thread pool mostly waits for itself.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A tiny project with its data prepared (`dvc repro prepare`) and an empty MLflow store, made once;
    each test trains in a copy."""
    root = copy_project(tmp_path_factory.mktemp("prepared") / "project")
    set_params(root, TINY)
    run(["dvc", "repro", "prepare"], cwd=root)
    mlflow_client(root).search_experiments()  # creates the store's tables, which takes seconds
    return root


@pytest.fixture
def project(prepared, tmp_path) -> Path:
    return Path(shutil.copytree(prepared, tmp_path / "project", symlinks=True))


@pytest.fixture
def one_thread():
    """ONE_THREAD for the work this test does in the test process itself."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def history(client, run_id: str, key: str = "loss") -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def test_train_stage_killed_mid_epoch_resumes_under_dvc_repro_and_ends_as_an_uninterrupted_run(prepared, project, tmp_path):
    # Small batches make a long epoch and sparse checkpoints leave time between them, so that the kill
    # lands past a checkpoint and well before the end however fast the machine.
    set_params(project, {"train": {"ckpt_every_steps": 10, "log_every": 1, "batch_size": 4}})
    steps = 200 // 4
    last, run_json, client = project / "models" / "last.pt", project / "models" / "run.json", mlflow_client(project)
    with open(project / "killed.log", "w") as log:
        first = subprocess.Popen(["dvc", "repro", "train"], cwd=project, env=command_env(project, ONE_THREAD),
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # Kill once a checkpoint exists and MLflow shows training two steps past it. Training is
        # frozen first to see that no newer checkpoint was written meanwhile (else it goes on).
        deadline = time.monotonic() + 300
        while True:
            assert first.poll() is None, (project / "killed.log").read_text()
            assert time.monotonic() < deadline, "training never got past a checkpoint"
            if last.exists() and run_json.exists():
                run_id = json.loads(run_json.read_text())["run_id"]
                logged = max((step for step, _ in history(client, run_id)), default=0)
                if logged >= load_checkpoint(last)["state"]["step"] + 2:
                    os.killpg(first.pid, signal.SIGSTOP)
                    if load_checkpoint(last)["state"]["step"] < logged:
                        break
                    os.killpg(first.pid, signal.SIGCONT)
            time.sleep(0.05)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # dvc and the stage, as a crash or the OOM killer would
        first.wait()
    killed_at = max(step for step, _ in history(client, run_id))
    resumed_from = load_checkpoint(last)["state"]["step"]
    assert 0 < resumed_from < killed_at < steps

    second = run(["dvc", "repro", "train"], cwd=project, env=ONE_THREAD)
    assert f"resuming from models/last.pt at step {resumed_from} (epoch 0)" in second.stderr
    assert json.loads((project / "metrics" / "train.json").read_text())["steps"] == steps
    assert json.loads(run_json.read_text())["run_id"] == run_id
    (tracked,) = mlflow_runs(project)  # the same MLflow run goes on: no second one
    assert tracked.info.run_id == run_id and tracked.info.status == "FINISHED"
    losses = history(client, run_id)
    assert {step for step, _ in losses} == set(range(1, steps + 1))
    # The steps lost in the crash were trained again, identically.
    for step in range(resumed_from + 1, killed_at + 1):
        before, again = [loss for s, loss in losses if s == step]
        assert again == before
    # And the run ends where an uninterrupted one ends, to the bit.
    uninterrupted = Path(shutil.copytree(prepared, tmp_path / "uninterrupted", symlinks=True))
    set_params(uninterrupted, {"train": {"ckpt_every_steps": 10, "log_every": 1, "batch_size": 4}, "tracking": {"enabled": False}})
    run([sys.executable, "-m", "stages.train"], cwd=uninterrupted, env=ONE_THREAD)
    resumed, whole = (load_checkpoint(root / "models" / "last.pt") for root in (project, uninterrupted))
    assert resumed["model"].keys() == whole["model"].keys()
    assert all(torch.equal(resumed["model"][name], tensor) for name, tensor in whole["model"].items())
    assert resumed["state"]["recent_losses"] == whole["state"]["recent_losses"]
    assert (project / "metrics" / "train.json").read_bytes() == (uninterrupted / "metrics" / "train.json").read_bytes()


def test_a_dying_rank_restarts_the_job_from_the_last_checkpoint(project):
    set_params(project, {"train": {"nproc_per_node": 2, "batch_size": 8, "ckpt_every_steps": 2}})
    result = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--max-restarts=1", "--nproc_per_node=2",
                  str(REPO / "tests" / "rank_crash_worker.py")], cwd=project, env={"AVSE_TEST_CRASH_AT_STEP": "3"} | ONE_THREAD, timeout=300)
    assert "resuming from models/last.pt at step 2 (epoch 0)" in result.stderr
    assert json.loads((project / "metrics" / "train.json").read_text())["steps"] == STEPS_PER_EPOCH
    assert load_checkpoint(project / "models" / "last.pt")["state"]["step"] == STEPS_PER_EPOCH
    (tracked,) = mlflow_runs(project)
    assert tracked.info.status == "FINISHED"
    assert tracked.info.run_id == json.loads((project / "models" / "run.json").read_text())["run_id"]


def test_non_finite_losses_are_skipped_then_stop_the_run_with_the_last_good_checkpoint(project):
    # A learning rate this large makes the first step's weights overflow every later forward pass.
    set_params(project, {"train": {"lr": 1e30, "warmup_steps": 0, "ckpt_every_steps": 1, "max_bad_steps": 3}})
    result = run([sys.executable, "-m", "stages.train"], cwd=project, check=False, env=ONE_THREAD)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        "error: training stopped after 3 consecutive steps with a non-finite loss or gradients (train.max_bad_steps); "
        "the last good checkpoint is models/last.pt (step 1)")
    skipped = [line.split("WARNING ")[1] for line in result.stderr.splitlines() if "step skipped" in line]
    assert skipped == [f"step {s}: non-finite loss or gradients, step skipped ({s} in a row)" for s in (1, 2, 3)]
    checkpoint = load_checkpoint(project / "models" / "last.pt")  # written after step 1, never after
    assert checkpoint["state"]["step"] == 1 and checkpoint["state"]["bad_in_a_row"] == 0
    (tracked,) = mlflow_runs(project)
    assert tracked.info.status == "FAILED"
    assert history(mlflow_client(project), tracked.info.run_id, "skipped_steps") == [(1, 1.0), (2, 2.0), (3, 3.0)]


def test_a_full_disk_while_embedding_keeps_the_previous_embeddings(project, monkeypatch, capsys, one_thread):
    monkeypatch.chdir(project)
    assert cli.main(["train", "-S", "train.max_steps=1", "-S", "tracking.enabled=false"]) == 0
    assert cli.main(["embed"]) == 0
    embeddings = project / "embeddings"
    before = {p.name: p.read_bytes() for p in (embeddings / "test").iterdir()}
    assert sorted(before) == ["captions.pt", "images.pt", "meta.json"]
    capsys.readouterr()
    fill_disk_after(monkeypatch, room=2048)
    assert cli.main(["embed"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (  # after the progress bars
        "error: embeddings/test: not written, the disk is full (No space left on device); any previous version is kept")
    assert {p.name: p.read_bytes() for p in (embeddings / "test").iterdir()} == before
    assert [p.name for p in embeddings.iterdir()] == ["test"]  # no partial folder left


@pytest.mark.parametrize("overrides, message", [
    (["train.batch_size=many"], "train.batch_size: 'many' is not a positive integer"),
    (["train.batchsize=8"], "train.batchsize: unknown key (did you mean train.batch_size?)"),
    (["model.block_dim=24"], "model.block_dim: 24 does not divide model.embed_size (256)"),
    (["model.keep_ratio=1.2"], "model.keep_ratio: 1.2 is not a number in (0, 1]"),
    (["model.views=0"], "model.views: 0 is not an integer >= 1"),
    (["model.vision.name=swin-tiny", "data.img_res=16"],
     "data.img_res: 16 is too small for model.vision.name 4-token windows (final grid 2x2); use at least 32"),
    (["data.cache_res=64", "data.img_res=224"],
     "data.cache_res: 64 is smaller than data.img_res: 224; prepare with -S data.cache_res=224 (or 0 to decode the JPEGs)"),
])
def test_bad_parameters_stop_training_with_one_line_before_any_work(tmp_path, monkeypatch, capsys, overrides, message):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")  # and no prepared data: nothing may get that far
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", *(f"--set={override}" for override in overrides)]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert [p.name for p in tmp_path.iterdir()] == ["params.yaml"]


def test_an_image_cache_too_small_or_stale_stops_train_and_embed_with_one_line(project, monkeypatch, capsys, one_thread):
    monkeypatch.chdir(project)
    cache = "data/prepared/synthetic/train_images.npy"  # prepared at TINY's 32 px
    assert cli.main(["train", "-S", "data.cache_res=48"]) == 2
    assert capsys.readouterr().err == f"error: {cache}: holds 32 px images, but data.cache_res is 48; prepare again with data.cache_res: 48\n"
    assert not (project / "models").exists()
    assert cli.main(["train", "-S", "train.max_steps=1", "-S", "tracking.enabled=false"]) == 0
    capsys.readouterr()
    test_cache = "data/prepared/synthetic/test_images.npy"
    for overrides, message in (
        (["data.cache_res=16"], "data.cache_res: 16 is smaller than data.img_res: 32; prepare with -S data.cache_res=32 (or 0 to decode the JPEGs)"),
        (["data.cache_res=0"], f"{test_cache}: holds 32 px images, but data.cache_res is 0; prepare again with data.cache_res: 0"),
    ):
        assert cli.main(["embed", *(f"--set={override}" for override in overrides)]) == 2
        assert capsys.readouterr().err == f"error: {message}\n"
    assert not (project / "embeddings").exists()


def test_more_processes_than_gpus_stop_before_launching(tmp_path, monkeypatch, capsys):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    monkeypatch.setattr("subprocess.run", lambda *args, **kwargs: pytest.fail("torchrun was launched"))
    assert cli.main(["train", "-S", "train.nproc_per_node=2"]) == 2
    assert capsys.readouterr().err == "error: train.nproc_per_node: 2 processes but only 1 GPUs (NCCL needs one GPU per process)\n"
    assert [p.name for p in tmp_path.iterdir()] == ["params.yaml"]
