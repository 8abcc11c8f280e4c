"""Runs as clusters run them: a stop signal mid-epoch becomes a checkpoint that the rerun resumes from to the bits of a
run never interrupted (in the same MLflow run), and a run over two torchrun agents trains to the standalone run's bits."""

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, command_env, free_port, mlflow_client, run

HOOK = REPO / "tests" / "stop_hook"
# The embedded data, small: 8 optimiser steps of an epoch of 25 (12 on two processes); the signal comes after step 2.
SETTINGS = ["data.synthetic.train_images=40", "data.synthetic.dev_images=10", "data.synthetic.test_images=10",
            "data.synthetic.image_size=32", "data.img_res=32", "data.cache_res=32", "data.num_workers=0", "data.vocab_size=100",
            "model.vision.name=vit-tiny", "model.embed_size=32", "model.block_dim=16", "train.batch_size=8", "train.epochs=1",
            "train.max_steps=8", "train.log_every=1"]
MARK_STEP = 2


def avse(stage: str, project: Path, *settings: str) -> list[str]:
    return [sys.executable, "-m", "avse.cli", stage, *(f"-S{s}" for s in [*SETTINGS, *settings])]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stop")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    for stage in ("synthesize", "prepare"):
        run(avse(stage, root), cwd=root)
    return root


def trained_state(models: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(models / "last.pt", weights_only=True)
    return checkpoint["model"] | {f"optimizer.{k}": v for k, v in checkpoint["optimizer"]["state"][0].items()}


@pytest.fixture(scope="module")
def uninterrupted(prepared) -> dict[int, dict[str, torch.Tensor]]:
    """The bits of runs never interrupted, by process count, trained once each."""
    states = {}
    for processes in (1, 2):
        run(avse("train", prepared, f"train.nproc_per_node={processes}", "tracking.enabled=false"), cwd=prepared, timeout=600)
        states[processes] = trained_state(prepared / "models")
        shutil.rmtree(prepared / "models")
    return states


def stop_mid_epoch(command: list[str], cwd: Path, marker: Path, extra_env: dict[str, str]) -> subprocess.CompletedProcess:
    """Start `command`, send it SIGTERM once the first process has done optimiser step MARK_STEP, and wait for it."""
    env = command_env(cwd, extra_env | {"AVSE_TEST_MARK_STEP": str(MARK_STEP), "AVSE_TEST_MARKER": str(marker)})
    env["PYTHONPATH"] = f"{HOOK}:{env['PYTHONPATH']}"
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.mark.parametrize("launcher", ["avse train, 1 process", "avse train, 2 processes, in copies of the project as DVC's queue runs"])
def test_sigterm_mid_epoch_checkpoints_and_the_rerun_ends_with_the_bits_of_an_uninterrupted_run(launcher, prepared, uninterrupted, tmp_path):
    processes = 1 if "1 process" in launcher else 2
    project = tmp_path / "project"
    shutil.copytree(prepared, project, symlinks=True)
    # DVC's queue runs each experiment in a temporary copy, deleted with a failed run, and names the project in DVC_ROOT:
    # the stopped run and its rerun each get a copy of their own, and the checkpoint must outlive the first.
    in_copies = "copies" in launcher
    copies = [Path(shutil.copytree(prepared, tmp_path / f"copy-{n}", symlinks=True)) for n in (1, 2)] if in_copies else [project] * 2
    extra_env = {"DVC_ROOT": str(project)} if in_copies else {}
    # One process reads its batches through loader workers (which must neither print tracebacks nor keep it from exiting).
    command = avse("train", project, f"train.nproc_per_node={processes}", f"data.num_workers={2 if processes == 1 else 0}")

    stopped = stop_mid_epoch(command, copies[0], tmp_path / "marker", extra_env)
    assert stopped.returncode != 0, stopped.stderr
    errors = [line for line in stopped.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stopped.stderr, stopped.stderr
    assert "KeyboardInterrupt" not in stopped.stderr
    step = int(errors[0].split(" at step ")[1].split()[0])
    assert MARK_STEP < step < 8, errors  # mid-epoch
    last = next((project / ".avse" / "resume").glob("*/last.pt")) if in_copies else Path("models/last.pt")
    assert errors[0] == (f"error: stopped by SIGTERM at step {step} of 8, saved in {last}; "
                         "rerun the same command (or dvc repro) to resume")
    checkpoint = torch.load(project / last, weights_only=True)
    assert checkpoint["state"]["step"] == step
    client = mlflow_client(project)
    stopped_run = client.get_run(checkpoint["run_id"])
    assert stopped_run.info.status == "KILLED" and stopped_run.data.tags["avse.stopped"].startswith(f"at step {step} ")

    if in_copies:
        shutil.rmtree(copies[0])  # as DVC deletes a failed run's copy
    resumed = run(command, cwd=copies[1], timeout=600, env=extra_env)
    assert f"resuming from {last} at step {step}" in resumed.stderr
    final = trained_state(copies[1] / "models")  # a finished run's last.pt is its copy's output
    if in_copies:
        assert not last.parent.exists()  # nothing is left to resume in the project
    expected = uninterrupted[processes]
    assert final.keys() == expected.keys()
    assert [name for name in final if not torch.equal(final[name], expected[name])] == []
    assert client.get_run(checkpoint["run_id"]).info.status == "FINISHED"  # the same MLflow run, finished


def test_two_torchrun_agents_with_c10d_rendezvous_train_to_the_bits_of_the_standalone_run(prepared, uninterrupted, tmp_path):
    """The multi-node command of docs/clusters.md, as two nodes of one process each on this machine. Each node here has
    every core of the machine: `train.threads=1` gives each process what the standalone run's got."""
    project = tmp_path / "project"
    shutil.copytree(prepared, project, symlinks=True)
    port = free_port()
    agent = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
             f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=avse-two-nodes", "-m", "avse.cli",
             *avse("train", project, "train.nproc_per_node=2", "train.threads=1", "tracking.enabled=false")[3:]]
    env = command_env(project)
    agents = [subprocess.Popen(agent, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [process.communicate(timeout=600) for process in agents]
    assert [process.returncode for process in agents] == [0, 0], outputs
    assert any("2 process(es) of 1 thread(s), 8 steps of global batch 16" in stderr for _, stderr in outputs)
    final, expected = trained_state(project / "models"), uninterrupted[2]
    assert [name for name in final if not torch.equal(final[name], expected[name])] == []
