import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from avse.config import from_dict

REPO = Path(__file__).resolve().parents[1]
F30K_FIXTURES = Path(os.environ.get("AVSE_F30K_FIXTURES", REPO.parent / "shared" / "fixtures" / "f30k"))

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

@pytest.fixture(autouse=True)
def torch_global_settings():
    """What a test switches globally (a training run in the test process sets deterministic algorithms and the
    attention kernels, `torch.set_num_threads`) is put back afterwards, so that no test runs under another's."""
    cuda = torch.backends.cuda
    fused = (cuda.enable_flash_sdp, cuda.enable_mem_efficient_sdp, cuda.enable_cudnn_sdp, cuda.enable_math_sdp)
    saved = ((cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(), cuda.cudnn_sdp_enabled(), cuda.math_sdp_enabled()),
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.get_num_threads())
    yield
    kernels, deterministic, warn_only, cudnn_deterministic, threads = saved
    for enable, enabled in zip(fused, kernels):
        enable(enabled)
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.backends.cudnn.deterministic = cudnn_deterministic
    torch.set_num_threads(threads)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def f30k_fixtures() -> Path:
    if not F30K_FIXTURES.exists():
        pytest.skip(f"Flickr30K caption fixtures not found at {F30K_FIXTURES}")
    return F30K_FIXTURES


# Parameters small enough for the whole pipeline to run in about a minute on 2 CPU cores.
TINY = {
    "data": {"synthetic": {"train_images": 40, "dev_images": 10, "test_images": 10, "image_size": 32},
             "img_res": 32, "cache_res": 32, "num_workers": 0, "vocab_size": 100},
    "model": {"vision": {"name": "vit-tiny"}, "embed_size": 32, "block_dim": 16},  # 8 px patches: 16 at 32 px
    "train": {"batch_size": 16, "epochs": 1, "log_every": 2},
    "embed": {"batch_size": 8},
}


def make_config(tree: dict | None = None):
    """A validated Config from a (partial) params tree."""
    return from_dict(tree or {})


def copy_project(root: Path) -> Path:
    """A copy of the pipeline (dvc.yaml, params, stages, library) in its own DVC repo at `root`."""
    root.mkdir(parents=True)
    for name in ("avse", "stages"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, root / name)
    run(["dvc", "init", "--no-scm", "-q"], cwd=root)
    return root


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return copy_project(tmp_path / "project")


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One `dvc repro` of the TINY parameters, shared by the tests that only read its outputs
    (or copy it with :func:`copy_finished`): a whole pipeline run costs minutes on 2 cores."""
    root = copy_project(tmp_path_factory.mktemp("tiny") / "project")
    set_params(root, TINY)
    run(["dvc", "repro"], cwd=root)
    return root


def copy_finished(project: Path, root: Path) -> Path:
    """A copy of a finished project, DVC cache and MLflow store included, to change without touching the original."""
    shutil.copytree(project, root, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def set_params(project: Path, tree: dict) -> None:
    """Merge `tree` into the project's params.yaml."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    _merge(params, tree)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _merge(target: dict, values: dict) -> None:
    for key, value in values.items():
        if isinstance(value, dict):
            _merge(target.setdefault(key, {}), value)
        else:
            target[key] = value


def mlflow_client(project: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")


def mlflow_runs(project: Path) -> list:
    client = mlflow_client(project)
    experiment = client.get_experiment_by_name("avse")
    return client.search_runs([experiment.experiment_id]) if experiment else []


def command_env(cwd: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """This interpreter's environment, with its scripts (dvc, torchrun) on PATH and `cwd` importable."""
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)  # set by MLflow calls made in the test process; commands choose their own store
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    # After `cwd`, what the suite itself was given (`make test-compat` lays other package versions over the venv).
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(cwd), os.environ.get("PYTHONPATH")]))
    # Commands run on the CPU (gloo for several processes) on any machine: a GPU machine may have one GPU where a
    # test starts two processes, and the CPU results are what the tests compare with. CUDA tests run in-process.
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env | (extra or {})


def run(cmd: list[str], cwd: Path, check: bool = True, timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a command with this interpreter's environment (plus `env`); returns stdout and stderr as text.

    The timeout turns a hung command (a stuck process group, say) into a failure, not a stuck suite; the
    command runs in its own session so that its children (dvc's stages, torchrun's workers) go with it.
    """
    with subprocess.Popen(cmd, cwd=cwd, env=command_env(cwd, env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except BaseException:  # the timeout, or an interrupted test run
            os.killpg(process.pid, signal.SIGKILL)
            raise
    result = subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


class FullDisk:
    """A file on a disk that fills up after `room` bytes (characters for a text file): writes past it raise
    OSError(ENOSPC), as the kernel's do."""

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def write(self, data) -> int:
        if len(data) > self.room:
            self.file.write(data[: self.room] if isinstance(data, str) else bytes(data)[: self.room])
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def fill_disk_after(monkeypatch, room: int) -> None:
    """Files that tensors are saved into (checkpoints, embeddings) run out of space after `room` bytes;
    torch.save's own serialisation runs up to that point."""
    from avse import checkpoint

    monkeypatch.setattr(checkpoint, "open", lambda path, mode: FullDisk(open(path, mode), room), raising=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """An MLflow server started by `command` in its own process group, so stopping it stops its workers too."""

    def __init__(self, command: list[str], port: int, cwd: Path | None = None):
        self.command, self.port, self.cwd, self.process = command, port, cwd, None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(self.command, cwd=self.cwd, start_new_session=True, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=1)
                return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError("mlflow server did not start")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)

    def post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(f"{self.uri}/api/2.0/mlflow/{path}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(f"{self.uri}/api/2.0/mlflow/{path}", timeout=10) as response:
            return json.load(response)
