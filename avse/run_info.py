"""What a tracked run says about itself: its name, its source and version, and the datasets it read.

These fill the columns the MLflow UI is built around (Run Name, Source, Dataset) and
the tags that tell where a result came from: the git commit, the DVC experiment, the
DVC hash of the prepared data.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from avse.config import PARAMS_FILE, Config, from_dict, load_yaml
from avse.errors import AvseError, ConfigError

TRAIN_SOURCE = "stages/train.py"
NAME_SETTINGS = 6  # settings named in a run name at most; more are counted


@dataclass(frozen=True)
class SplitInput:
    """A prepared split as a run input: `name` (e.g. `f30k-train`), the digest of its index, its counts."""

    name: str
    context: str  # `training` or `evaluation`
    index: Path
    digest: str
    images: int
    captions: int


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def dvc_data_digest(dataset: str, lock: Path = Path("dvc.lock")) -> str:
    """The md5 that `dvc.lock` records for `data/prepared/<dataset>` (empty outside a DVC pipeline run)."""
    try:
        stages = load_yaml(lock.read_text(encoding="utf-8")).get("stages", {})
    except (OSError, yaml.YAMLError, AttributeError):
        return ""
    wanted = f"data/prepared/{dataset}"
    for out in stages.get("prepare", {}).get("outs", []):
        if out.get("path") == wanted:
            return str(out.get("md5", ""))
    return ""


def run_tags(config: Config) -> dict[str, str]:
    """Tags the MLflow UI groups, filters and links runs by: settings, MLflow's source tags, versions."""
    commit = git("rev-parse", "HEAD")
    return {
        "dataset": config.data.dataset,
        "backbone": config.model.vision.name,
        "text_backbone": config.model.text.name,
        "resolution": str(config.data.img_res),
        "views": str(config.model.views),
        "matching": config.model.matching,
        "git_commit": commit,
        "dvc_experiment": os.environ.get("DVC_EXP_NAME", ""),
        "dvc_data_md5": dvc_data_digest(config.data.dataset),
        "mlflow.source.name": TRAIN_SOURCE,
        "mlflow.source.type": "LOCAL",
        "mlflow.source.git.commit": commit,
        "mlflow.source.git.branch": git("rev-parse", "--abbrev-ref", "HEAD"),
    }


def reference_params(params_file: Path = Path(PARAMS_FILE)) -> dict[str, Any]:
    """The parameters runs are named against: the committed `params.yaml`, else the one on disk
    (validated, so that `1e-3` and `0.001` are the same value); empty when neither is valid."""
    text = git("show", f"HEAD:{params_file.as_posix()}") or (params_file.read_text(encoding="utf-8") if params_file.exists() else "")
    try:
        return from_dict(load_yaml(text) or {}).flat()
    except (yaml.YAMLError, ConfigError, AttributeError):
        return {}


def run_name(config: Config, reference: dict[str, Any] | None = None, experiment: str | None = None) -> str:
    """`<dataset>-<backbone>`, then the DVC experiment's name when there is one, else the settings that
    differ from `reference` (the committed `params.yaml`), e.g. `synthetic-vit-tiny-p16-block_dim256-views1`."""
    base = f"{config.data.dataset}-{config.model.vision.name.rstrip('/').split('/')[-1]}"
    experiment = os.environ.get("DVC_EXP_NAME", "") if experiment is None else experiment
    if experiment:
        return f"{base}-{experiment}"
    reference = reference_params() if reference is None else reference
    changed = [(key, value) for key, value in config.flat().items()
               if key in reference and reference[key] != value and not key.startswith("tracking.")]
    parts = [f"{key.split('.')[-1]}{str(value).rstrip('/').split('/')[-1]}" for key, value in changed[:NAME_SETTINGS]]
    if len(changed) > NAME_SETTINGS:
        parts.append(f"+{len(changed) - NAME_SETTINGS}")
    return "-".join([base, *parts])


def split_inputs(config: Config, prepared: Path) -> list[SplitInput]:
    """The training split and the evaluation splits (dev, and `embed.split`) of a prepared dataset, those that exist."""
    splits = {"train": "training", "dev": "evaluation", config.embed.split: "evaluation"}
    return [split_input(config, prepared, split, context) for split, context in splits.items() if (prepared / f"{split}.csv").exists()]


def split_input(config: Config, prepared: Path, split: str, context: str) -> SplitInput:
    """One prepared split as a run input, read in `context` (`training` or `evaluation`)."""
    stats_path = prepared / "stats.json"
    try:
        stats = json.loads(stats_path.read_text(encoding="utf-8"))[split]
    except (OSError, json.JSONDecodeError, KeyError) as err:
        raise AvseError(f"{stats_path}: cannot read the prepared statistics of {split!r} ({err}); run the prepare stage") from None
    index = prepared / f"{split}.csv"
    return SplitInput(name=f"{config.data.dataset}-{split}", context=context, index=index,
                      digest=hashlib.sha256(index.read_bytes()).hexdigest()[:16],
                      images=int(stats["images"]), captions=int(stats["captions"]))
