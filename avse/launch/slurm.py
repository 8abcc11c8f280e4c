"""Each experiment as a Slurm batch job (`avse exp NAME --slurm`), in a working copy that outlives a requeue.

A job trains in a copy of its own, `.avse/jobs/<name>/`: a clone of the project at its commit with its uncommitted
changes, sharing the project's DVC cache and (through `AVSE_PROJECT_ROOT`) its MLflow store. Two jobs never share
DVC's locks, and a requeued job finds its own copy and its checkpoint (`avse.training.run.resume_location`). In the
copy the job runs the row's `dvc exp run`; once that succeeds it pushes the experiment into the project, where
`dvc exp show` lists it and `dvc exp apply` brings its outputs from the shared cache, and removes the copy.

How a job stops:
- preemption, `scontrol requeue` and `scancel` send SIGTERM to every process of the job: training writes `last.pt` at
  the next step (`avse.launch.signals`) within Slurm's KillWait, and Slurm requeues the job or ends it;
- ahead of the time limit Slurm sends SIGUSR1 to the job's runner alone (`--signal=B:USR1@...`): the runner passes it to
  training, which writes `last.pt` and stops, and then requeues the job itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from avse.config import load_yaml
from avse.errors import AvseError, ConfigError
from avse.experiments import Experiment
from avse.tracking import PROJECT_ROOT_VARIABLE, client_for, ensure_experiment, store_uri

JOBS_DIR = Path(".avse/jobs")  # in the project: `<name>/` (a job's working copy), `<name>.sh`, `<name>.log`
# Slurm's notice ahead of the time limit: room for the step in flight, an epoch's dev evaluation and the checkpoint.
STOP_BEFORE_LIMIT_SECONDS = 300
# Paths a row's data may name relative to the project; those missing from a fresh clone (datasets placed in the project,
# not versioned) are linked into the copy.
DATA_PATH_KEYS = ("data.root", "data.images", "eval.pm_gt_dir")
TRAINING_STAGE = "stages.train"  # the command of dvc.yaml's train stage, which a time-limit notice goes to


def submit(experiment: Experiment, overrides: Sequence[str], params: str, gpus_per_node: int | None,
           sbatch_options: str) -> str:
    """Make the experiment's working copy and job script, submit it with `sbatch`; returns the job id."""
    project = Path.cwd().resolve()
    config = experiment.config(params, overrides)
    _check_project(project, experiment.name)
    copy, script, log = (project / JOBS_DIR / name for name in (experiment.name, f"{experiment.name}.sh", f"{experiment.name}.log"))
    if copy.exists():
        raise AvseError(f"{experiment.name}: {JOBS_DIR / experiment.name} exists: a job of this experiment is queued or running, "
                        f"or one that failed left it (its log: {JOBS_DIR / log.name}); `scancel --name avse-{experiment.name}` "
                        "and remove the folder to submit it again")
    gpus = experiment.processes if gpus_per_node is None else gpus_per_node
    if 0 < gpus < experiment.processes:
        raise ConfigError(f"--gpus-per-node {gpus}: {experiment.name} trains with train.nproc_per_node = {experiment.processes}")
    if config.tracking.enabled:  # made once here: jobs starting together would race to create the store and experiment
        uri = store_uri(config.tracking.uri, project)
        ensure_experiment(client_for(uri), config.tracking.experiment, uri)
    try:
        make_working_copy(project, copy, config.flat())
        command = [sys.executable, "-m", "dvc", *experiment.run_command(extra=overrides)[1:]]
        script.write_text(job_script(experiment, project, copy, log, gpus, command))
        submitted = subprocess.run(["sbatch", "--parsable", *shlex.split(sbatch_options), str(script)], capture_output=True, text=True)
    except BaseException:
        shutil.rmtree(copy, ignore_errors=True)
        raise
    if submitted.returncode:
        shutil.rmtree(copy, ignore_errors=True)
        raise AvseError(f"{experiment.name}: sbatch failed: {submitted.stderr.strip() or submitted.stdout.strip()}")
    return submitted.stdout.strip().split(";")[0]


def _check_project(project: Path, name: str) -> None:
    """The project must be the root of a git repository (`dvc exp run` needs one), with no experiment of this name."""
    toplevel = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=project, capture_output=True, text=True)
    if toplevel.returncode or Path(toplevel.stdout.strip()).resolve() != project:
        raise ConfigError(f"--slurm: {project} is not the root of a git repository; a job runs `dvc exp run`, which needs one")
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], cwd=project, capture_output=True, text=True, check=True)
    if any(ref.endswith(f"/{name}") and not ref.startswith("refs/exps/exec/") for ref in refs.stdout.split()):
        raise AvseError(f"{name}: the project has an experiment of this name; `dvc exp remove {name}` to run it again")


def make_working_copy(project: Path, copy: Path, settings: dict) -> None:
    """A clone of `project` at its commit, with its uncommitted changes and untracked files, DVC's cache of the
    project, and links to the datasets the row reads that are in the project but not versioned."""
    def git(*args: str, cwd: Path = project, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, **kwargs)

    commit = git("rev-parse", "HEAD", text=True).stdout.strip()
    copy.parent.mkdir(parents=True, exist_ok=True)
    git("clone", "--quiet", "--no-checkout", str(project), str(copy))
    git("checkout", "--quiet", "--detach", commit, cwd=copy)
    changes = git("diff", "--binary", "HEAD").stdout
    if changes:
        git("apply", "--whitespace=nowarn", cwd=copy, input=changes)
    for name in git("ls-files", "--others", "--exclude-standard", "-z", text=True).stdout.split("\0"):
        if name:
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(project / name, copy / name)
    local_config = project / ".dvc" / "config.local"  # remotes and credentials of this machine
    if local_config.exists():
        shutil.copy2(local_config, copy / ".dvc" / "config.local")
    cache = subprocess.run([sys.executable, "-m", "dvc", "cache", "dir"], cwd=project, capture_output=True, text=True, check=True).stdout.strip()
    subprocess.run([sys.executable, "-m", "dvc", "config", "--local", "cache.dir", cache], cwd=copy, check=True, capture_output=True)
    linked = _link_unversioned_data(project, copy, settings)
    if linked:  # not part of the experiment: git leaves them out of its commit
        with (copy / ".git" / "info" / "exclude").open("a") as exclude:
            exclude.write("".join(f"/{path}\n" for path in linked))


def _link_unversioned_data(project: Path, copy: Path, settings: dict) -> list[str]:
    outputs = _fixed_stage_outputs(project / "dvc.yaml")
    linked = []
    for key in DATA_PATH_KEYS:
        value = settings.get(key)
        if not value or Path(value).is_absolute() or (copy / value).exists() or any(Path(value).is_relative_to(o) for o in outputs):
            continue
        if not (project / value).exists():
            raise ConfigError(f"{key}: {value} does not exist in {project}")
        (copy / value).parent.mkdir(parents=True, exist_ok=True)
        (copy / value).symlink_to(project / value)
        linked.append(Path(value).as_posix())
    return linked


def _fixed_stage_outputs(dvc_yaml: Path) -> list[Path]:
    """The outputs of dvc.yaml's stages that name one path whatever the parameters (`data/synthetic`)."""
    stages = (load_yaml(dvc_yaml.read_text()) or {}).get("stages", {})
    paths = (out if isinstance(out, str) else next(iter(out)) for stage in stages.values() for out in stage.get("outs", []))
    return [Path(path) for path in paths if "${" not in path]


def job_script(experiment: Experiment, project: Path, copy: Path, log: Path, gpus: int, command: list[str]) -> str:
    """The batch script: requeue on preemption, SIGUSR1 to the runner ahead of the time limit, the row's GPUs on one
    node. Options given to `sbatch` (`--sbatch`) override these."""
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name=avse-{experiment.name}",
        f"#SBATCH --output={log}",
        "#SBATCH --open-mode=append",  # a requeued attempt adds to the log
        "#SBATCH --requeue",
        f"#SBATCH --signal=B:USR1@{STOP_BEFORE_LIMIT_SECONDS}",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks=1",
        *([f"#SBATCH --gpus-per-node={gpus}"] if gpus else []),
        f"# {experiment.title}: {experiment.processes} process(es), in a working copy of {project}",
        f"cd {shlex.quote(str(copy))}",
        # `exec`: the runner is the batch shell, which the time-limit notice goes to.
        "exec " + shlex.join([sys.executable, "-m", "avse.launch.slurm", str(project), "--", *command]),
    ]
    return "\n".join(lines) + "\n"


def run_job(project: Path, command: list[str]) -> int:
    """The job: `command` (the row's `dvc exp run`) in the working copy (the current directory); on success the
    experiment goes to the project and the copy is removed. Returns the exit status."""
    copy, job = Path.cwd(), os.environ.get("SLURM_JOB_ID", "")
    attempt = int(os.environ.get("SLURM_RESTART_COUNT", "0")) + 1
    env = os.environ | {PROJECT_ROOT_VARIABLE: str(project), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                        "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    _adopt_orphans()
    notices: list[signal.Signals] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: notices.append(signal.Signals(signum)))
                for signum in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
    print(f"job {job}, attempt {attempt}: {shlex.join(command)}", flush=True)
    try:
        child = subprocess.Popen(command, env=env)
        passed_on = False
        while (returncode := _poll(child)) is None:
            # The time-limit notice goes to the runner alone; training may not have started when it comes.
            if signal.SIGUSR1 in notices and not passed_on:
                passed_on = _signal_training(signal.SIGUSR1)
        _wait_for_orphans()  # training outlives DVC when SIGTERM reaches both: its checkpoint is written before the job ends
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if returncode == 0:
        name = command[command.index("-n") + 1]
        pushed = subprocess.run([sys.executable, "-m", "dvc", "exp", "push", "--no-cache", "origin", name], env=env)
        if pushed.returncode:
            print(f"error: {name} finished but could not be pushed into {project}; its working copy {copy} keeps it "
                  f"(`dvc exp push --no-cache origin {name}` there)", file=sys.stderr)
            return pushed.returncode
        os.chdir(project)
        shutil.rmtree(copy)
        print(f"{name} finished: `dvc exp show` in {project} lists it, `avse exp {name} --evaluate` brings its results", flush=True)
        return 0
    if signal.SIGUSR1 in notices and signal.SIGTERM not in notices and job:
        print(f"the time limit is near: training stopped with a checkpoint; requeueing job {job}", flush=True)
        subprocess.run(["scontrol", "requeue", job])
    return returncode


def _poll(child: subprocess.Popen, seconds: float = 1.0) -> int | None:
    try:
        return child.wait(seconds)
    except subprocess.TimeoutExpired:
        return None


def _signal_training(signum: int) -> bool:
    """Send `signum` to the training stage's process once it handles the signal (until then the signal would end it);
    says whether it did."""
    import psutil

    sent = False
    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error, OSError):
            if TRAINING_STAGE in process.cmdline() and _handles(process.pid, signum):
                process.send_signal(signum)
                sent = True
    return sent


def _handles(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler for `signum` (Linux: the caught-signals mask in /proc/PID/status)."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught >> (signum - 1) & 1)


def _adopt_orphans() -> None:
    """Become the parent of descendants whose parent dies (Linux: PR_SET_CHILD_SUBREAPER), so they can be waited for."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)


def _wait_for_orphans() -> None:
    with contextlib.suppress(ChildProcessError):
        while True:
            os.waitpid(-1, 0)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m avse.launch.slurm PROJECT -- COMMAND... (the job script that `avse exp --slurm` writes)", file=sys.stderr)
        return 2
    return run_job(Path(argv[0]), argv[2:])


if __name__ == "__main__":
    sys.exit(main())
