import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
