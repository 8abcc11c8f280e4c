"""The parameter reference (`docs/parameters.md`), generated from `params.yaml`'s own comments.

`params.yaml` is the one place a parameter is described: each key's line carries its
default and, after `#`, what it means. `avse params --reference` writes the page from it,
and a test fails when the page is stale, when a key has no description, or when the file's
keys and the validated configuration's differ.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

from avse.config import Config
from avse.errors import ConfigError

_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_]\w*):(?P<value>[^#]*?)\s*(?:#\s*(?P<comment>.*))?$")


def described_parameters(params: str | Path) -> list[tuple[str, str, str]]:
    """`(key, default as written, description)` for every key of `params.yaml`, in the file's order."""
    path = Path(params)
    rows, sections = [], []  # sections: (indent, name) of the enclosing sections
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _LINE.match(line)
        if match is None:
            raise ConfigError(f"{path}:{number}: expected `key: value  # description`, got {line.strip()!r}")
        indent = len(match["indent"])
        while sections and sections[-1][0] >= indent:
            sections.pop()
        key = ".".join([name for _, name in sections] + [match["key"]])
        if not match["value"].strip():  # a section; its comment (if any) describes what it holds
            sections.append((indent, match["key"]))
            continue
        if not match["comment"]:
            raise ConfigError(f"{path}:{number}: {key} has no description (write it after `#` on its line)")
        rows.append((key, match["value"].strip(), match["comment"].strip()))
    return rows


def parameter_reference(params: str | Path) -> str:
    """The markdown page: one table per section of `params.yaml`."""
    rows = described_parameters(params)
    missing = set(Config().flat()) - {key for key, _, _ in rows}
    if missing:
        raise ConfigError(f"{params}: keys of the configuration missing from the file: {', '.join(sorted(missing))}")
    lines = ["# Parameters", "",
             "Every parameter of `params.yaml`, its default and what it does. Change one for a run with",
             "`dvc exp run -S key=value` or `avse <stage> -S key=value`; `avse params` prints the values in force.",
             "This page is generated from the comments of `params.yaml` by `avse params --reference`; edit those.", ""]
    for section, entries in itertools.groupby(rows, key=lambda row: row[0].split(".")[0]):
        lines += [f"## {section}", "", "| key | default | meaning |", "| --- | --- | --- |"]
        lines += [f"| `{key}` | `{default}` | {description.replace('|', '&#124;')} |" for key, default, description in entries]
        lines.append("")
    return "\n".join(lines)
