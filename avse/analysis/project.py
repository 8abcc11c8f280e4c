"""Where the notebooks find the project, its parameters and the pipeline outputs they read."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from avse.config import PARAMS_FILE, Config, load_config
from avse.errors import AvseError

PROJECT_ENV = "AVSE_PROJECT"
PROJECT_MARKER = "dvc.yaml"


def find_project(start: Path | None = None, environ: Mapping[str, str] = os.environ) -> Path:
    """The project folder: `$AVSE_PROJECT` when set, else the nearest folder holding `dvc.yaml`
    from `start` (default: the current directory) upwards, so a notebook run from `notebooks/`
    finds its parent."""
    if environ.get(PROJECT_ENV):
        root = Path(environ[PROJECT_ENV]).expanduser().resolve()
        if not (root / PROJECT_MARKER).is_file():
            raise AvseError(f"{PROJECT_ENV}={environ[PROJECT_ENV]}: no {PROJECT_MARKER} there (expected the project folder)")
        return root
    start = (start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / PROJECT_MARKER).is_file():
            return folder
    raise AvseError(f"{start}: no {PROJECT_MARKER} here or above; set {PROJECT_ENV} to the project folder")


def project_config(project: Path) -> Config:
    """The validated `params.yaml` of the project."""
    return load_config(project / PARAMS_FILE)


def project_file(project: Path, relative: str | Path, stage: str) -> Path:
    """`project / relative`, which the pipeline's `stage` writes; an AvseError naming both when it is absent."""
    path = project / relative
    if not path.exists():
        raise AvseError(f"{Path(relative).as_posix()} not found: run `dvc repro` ({stage} stage) first")
    return path
