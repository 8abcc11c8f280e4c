import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from avse.config import from_dict

REPO = Path(__file__).resolve().parents[1]
F30K_FIXTURES = Path(os.environ.get("AVSE_F30K_FIXTURES", REPO.parent / "shared" / "fixtures" / "f30k"))

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def f30k_fixtures() -> Path:
    if not F30K_FIXTURES.exists():
        pytest.skip(f"Flickr30K caption fixtures not found at {F30K_FIXTURES}")
    return F30K_FIXTURES


# Parameters small enough for the whole pipeline to run in about a minute on 2 CPU cores.
TINY = {
    "data": {"synthetic": {"train_images": 40, "dev_images": 10, "test_images": 10, "image_size": 32},
             "img_res": 32, "cache_res": 32, "num_workers": 0, "vocab_size": 100},
    "model": {"embed_size": 32, "block_dim": 16},
    "train": {"batch_size": 16, "epochs": 1, "log_every": 2},
    "embed": {"batch_size": 8},
}


def set_params(project: Path, tree: dict) -> None:
    """Merge a (partial) params tree into the project's params.yaml."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    for section, values in tree.items():
        _merge(params.setdefault(section, {}), values)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _merge(target: dict, values: dict) -> None:
    for key, value in values.items():
        if isinstance(value, dict):
            _merge(target.setdefault(key, {}), value)
        else:
            target[key] = value


def make_config(tree: dict | None = None):
    """A validated Config from a (partial) params tree."""
    return from_dict(tree or {})


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the pipeline (dvc.yaml, params, stages, library) in its own DVC repo."""
    root = tmp_path / "project"
    root.mkdir()
    for name in ("avse", "stages"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, root / name)
    run(["dvc", "init", "--no-scm", "-q"], cwd=root)
    return root


def run(cmd: list[str], cwd: Path, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a command with this interpreter's environment; returns stdout and stderr as text.

    The timeout turns a hung command (a stuck process group, say) into a failure, not a stuck suite.
    """
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = str(cwd)
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result
