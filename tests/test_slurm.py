"""`avse exp NAME --slurm` against a real Slurm (`tools/slurm-localhost.sh` starts one on this machine; CI does), and the
job runner's time-limit path on its own."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY, copy_project, mlflow_client, mlflow_runs, run, set_params

LOCAL_CLUSTER = Path(os.environ.get("SLURM_CONF") or "/tmp/avse-slurm/slurm.conf")


def slurm_env() -> dict[str, str]:
    return os.environ | ({"SLURM_CONF": str(LOCAL_CLUSTER)} if LOCAL_CLUSTER.exists() else {})


def slurm_answers() -> bool:
    if shutil.which("sbatch") is None:
        return False
    answer = subprocess.run(["sinfo", "--noheader", "--responding", "-o", "%T"], env=slurm_env(), capture_output=True, text=True)
    return answer.returncode == 0 and bool(answer.stdout.strip())


requires_slurm = pytest.mark.skipif(not slurm_answers(), reason="no Slurm cluster answers here (start one: sudo tools/slurm-localhost.sh)")

EXPERIMENTS = {
    "experiments": {
        # Long enough to be requeued mid-run: a checkpoint every 5 of 40 steps of 4 pairs.
        "slurm-long": {"title": "requeued row", "evaluation": "test", "set": {"train.batch_size": 4, "train.max_steps": 40, "train.ckpt_every_steps": 5}},
        "slurm-short": {"title": "row beside it", "evaluation": "test", "set": {"train.max_steps": 4, "train.seed": 1}},
    },
}


def job(job_id: str) -> dict[str, str]:
    shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=slurm_env(), capture_output=True, text=True, check=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", shown))


def wait_for(condition, what: str, seconds: float = 300):
    deadline = time.monotonic() + seconds
    while not (found := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1)
    return found


@requires_slurm
def test_two_rows_as_slurm_jobs_one_requeued_mid_run_both_end_as_experiments_of_the_project(tmp_path):
    project = copy_project(tmp_path / "project")
    for name in (".gitignore", ".dvcignore"):
        shutil.copy(REPO / name, project / name)
    shutil.rmtree(project / ".dvc")
    set_params(project, TINY)
    (project / "experiments.yaml").write_text(yaml.safe_dump(EXPERIMENTS, sort_keys=False))
    env = {"SLURM_CONF": slurm_env().get("SLURM_CONF", ""), "OMP_NUM_THREADS": "1"}
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "repro", "-q", "prepare"],
                    ["git", "add", "-A"], ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "project"]):
        run(command, cwd=project, env=env)

    submitted = run(["avse", "exp", "slurm-long", "slurm-short", "--slurm", "--gpus-per-node", "0",
                     "--sbatch", "--cpus-per-task=1 --mem=3G"], cwd=project, env=env)
    jobs = dict(re.findall(r"^(slurm-\w+): Slurm job (\d+)", submitted.stdout, re.M))
    assert jobs.keys() == {"slurm-long", "slurm-short"}, submitted.stdout
    assert (project / ".avse/jobs/slurm-long/.dvc/config.local").read_text().count(str(project / ".dvc" / "cache")) == 1

    # A checkpoint of the long row in the project (its run trains in a copy), then a requeue mid-run.
    checkpoint = wait_for(lambda: next((project / ".avse" / "resume").glob("*/last.pt"), None), "the long row's first checkpoint")
    run(["scontrol", "requeue", jobs["slurm-long"]], cwd=project, env=env)
    wait_for(lambda: job(jobs["slurm-long"])["JobState"] == "PENDING", "the requeued job to wait")
    run(["scontrol", "update", f"JobId={jobs['slurm-long']}", "StartTime=now"], cwd=project, env=env)  # skip Slurm's requeue delay
    for name, job_id in jobs.items():
        wait_for(lambda: job(job_id)["JobState"] in ("COMPLETED", "FAILED", "CANCELLED"), f"{name} to end", seconds=600)

    logs = {name: (project / ".avse" / "jobs" / f"{name}.log").read_text() for name in jobs}
    for name, job_id in jobs.items():
        assert job(job_id)["JobState"] == "COMPLETED", logs[name]
        assert not (project / ".avse" / "jobs" / name).exists()  # pushed into the project, then removed
    assert job(jobs["slurm-long"])["Restarts"] == "1" and "attempt 2:" in logs["slurm-long"]
    stopped = re.search(r"stopped by SIGTERM at step (\d+) of 40", logs["slurm-long"])
    resumed = re.search(r"resuming from .*last\.pt at step (\d+)", logs["slurm-long"])
    assert stopped and resumed and int(resumed.group(1)) == int(stopped.group(1)) > 0, logs["slurm-long"]
    assert not checkpoint.parent.exists()  # the finished run left nothing to resume

    shown = json.loads(run(["dvc", "exp", "show", "--json"], cwd=project, env=env).stdout)
    experiments = {e["name"]: e for baseline in shown for e in (baseline.get("experiments") or []) for e in e["revs"]}
    assert experiments.keys() == set(jobs)
    metrics = experiments["slurm-long"]["data"]["metrics"]["metrics/train.json"]["data"]
    assert metrics["steps"] == 40

    runs = mlflow_runs(project)  # the project's store: one run each, the requeued one continued
    assert sorted(r.data.params["train.max_steps"] for r in runs) == ["4", "40"] and {r.info.status for r in runs} == {"FINISHED"}
    long_run = next(r for r in runs if r.data.params["train.max_steps"] == "40")
    losses = mlflow_client(project).get_metric_history(long_run.info.run_id, "loss")
    assert sorted({m.step for m in losses}) == list(range(TINY["train"]["log_every"], 41, TINY["train"]["log_every"]))


STAND_IN_TRAINING = """
import pathlib, signal, sys, time
def stop(signum, frame):
    pathlib.Path("stopped").write_text(signal.Signals(signum).name)
    sys.exit(2)
signal.signal(signal.SIGUSR1, stop)
pathlib.Path("started").touch()
time.sleep(60)
"""


def test_the_time_limit_notice_reaches_training_started_after_it_and_the_job_requeues_itself(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'scontrol-args'}\n")
    (bin_dir / "scontrol").chmod(0o755)
    env = os.environ | {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "0"}
    # The job's command starts training a second after the notice: `stages.train` is in no process's arguments until then.
    command = ["sh", "-c", 'sleep 1; exec "$0" -c "$1" stages.train', sys.executable, STAND_IN_TRAINING]
    runner = subprocess.Popen([sys.executable, "-m", "avse.launch.slurm", str(tmp_path), "--", *command],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True)
    assert runner.stdout.readline().startswith("job 77, attempt 1: ")  # its handlers are in place
    runner.send_signal(signal.SIGUSR1)  # what `--signal=B:USR1@...` sends the batch shell, which the runner is
    assert runner.wait(timeout=30) == 2
    assert (tmp_path / "started").exists() and (tmp_path / "stopped").read_text() == "SIGUSR1"
    assert (tmp_path / "scontrol-args").read_text().split() == ["requeue", "77"]
