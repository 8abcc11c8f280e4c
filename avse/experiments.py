"""Named experiments (the paper's rows) from `experiments.yaml`, and the `dvc exp run` command of each.

A row is `params.yaml` plus its settings: the groups it `uses`, in order, then its own `set`.
Settings are `-S` overrides (`key: value` with the keys of `params.yaml`), so a row runs as
`dvc exp run -n NAME -S key=value ...` and every other tool (`avse train --dry-run`, the tests,
the README's table) applies the same overrides to the same `params.yaml`.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

from avse.config import PARAMS_FILE, Config, load_config, read_yaml_mapping
from avse.errors import ConfigError

EXPERIMENTS_FILE = "experiments.yaml"
# A row's architecture at full size with nothing to download, for timing and memory: random weights of the
# same shapes (BERT keeps its 30522-token vocabulary) and captions of 96 word pieces (every Flickr30K caption
# fits; the rows do not truncate, and a dry run would otherwise assume BERT's 512 positions).
FULL_SIZE_RANDOM = ["model.vision.init=random", "model.text.init=random", "data.vocab_size=30522", "model.text.max_len=96"]


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    evaluation: str  # what its evaluate stage reports, in words
    settings: dict[str, Any]  # `{key: value}` in the order they apply

    def overrides(self) -> list[str]:
        """The settings as `-S` arguments: `["model.vision.init=pretrained", ...]`."""
        return [f"{key}={format_value(value)}" for key, value in self.settings.items()]

    def config(self, params: str | Path = PARAMS_FILE, extra: Sequence[str] = ()) -> Config:
        """The validated configuration the experiment runs with (`extra` overrides applied last)."""
        return load_config(params, [*self.overrides(), *extra])

    @property
    def processes(self) -> int:
        return int(self.settings.get("train.nproc_per_node", 1))

    def run_command(self, queue: bool = False, extra: Sequence[str] = ()) -> list[str]:
        """`dvc exp run -n NAME [--queue] -S key=value ...`."""
        command = ["dvc", "exp", "run", "-n", self.name, *(["--queue"] if queue else [])]
        for override in [*self.overrides(), *extra]:
            command += ["-S", override]
        return command


def format_value(value: Any) -> str:
    """A value as `-S` writes it, read back as the same value by YAML (`true`, `0.0002`, `[9, 15]`)."""
    if isinstance(value, (bool, list)):
        return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()
    if isinstance(value, float) and "e" in repr(value) and "." not in repr(value):
        return repr(value).replace("e", ".0e")  # YAML reads `1e-05` as a string, `1.0e-05` as a number
    return str(value)


def load_experiments(path: str | Path = EXPERIMENTS_FILE) -> dict[str, Experiment]:
    """Every experiment of the file by name; a malformed file stops with the entry that is wrong."""
    raw = read_yaml_mapping(path, "run from the project root or pass --experiments")
    groups = _mapping(raw["groups"], f"{path}: groups") if "groups" in raw else {}
    for group, settings in groups.items():
        _settings(settings, f"{path}: groups.{group}")
    experiments = {}
    for name, entry in _mapping(raw.get("experiments"), f"{path}: experiments").items():
        where = f"{path}: experiments.{name}"
        entry = _mapping(entry, where)
        unknown = set(entry) - {"title", "evaluation", "uses", "set"}
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)} (allowed: title, evaluation, uses, set)")
        settings: dict[str, Any] = {}
        set_by: dict[str, str] = {}
        for group in entry.get("uses", []):
            if group not in groups:
                raise ConfigError(f"{where}.uses: no group {group!r} (groups: {', '.join(groups)})")
            for key, value in groups[group].items():
                if key in set_by:
                    raise ConfigError(f"{where}.uses: groups {set_by[key]!r} and {group!r} both set {key}")
                settings[key], set_by[key] = value, group
        if "set" in entry:  # a row may be its groups alone
            settings.update(_settings(entry["set"], f"{where}.set"))
        experiments[name] = Experiment(name, str(entry.get("title", name)), str(entry.get("evaluation", "")), settings)
    return experiments


def _mapping(value: Any, where: str) -> dict:
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"{where}: expected a mapping of names to entries")
    return value


def _settings(value: Any, where: str) -> dict[str, Any]:
    for key, setting in _mapping(value, where).items():
        if yaml.safe_load(format_value(setting)) != setting:
            raise ConfigError(f"{where}.{key}: {setting!r} does not survive -S {key}={format_value(setting)} (quote it differently)")
    return value


def select(experiments: dict[str, Experiment], patterns: Sequence[str]) -> list[Experiment]:
    """The experiments named by `patterns` (names or shell patterns such as `f30k-*`), in file order."""
    chosen = []
    for pattern in patterns:
        matches = [e for name, e in experiments.items() if fnmatch.fnmatchcase(name, pattern)]
        if not matches:
            raise ConfigError(f"no experiment {pattern!r} in {EXPERIMENTS_FILE} (experiments: {', '.join(experiments)})")
        chosen += [e for e in matches if e not in chosen]
    return chosen


def markdown_table(experiments: dict[str, Experiment]) -> str:
    """The README's table of the experiments: what each is, its layout, and its one command."""
    lines = ["| experiment | processes x batch | evaluation | command |", "| --- | --- | --- | --- |"]
    for e in experiments.values():
        batch = e.settings.get("train.batch_size", "")
        lines.append(f"| {e.title} | {e.processes} x {batch} | {e.evaluation} | `avse exp {e.name}` |")
    return "\n".join(lines)
