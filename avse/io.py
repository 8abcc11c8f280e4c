"""Atomic file output: readers never see a half-written file or folder."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

from avse.errors import DiskFullError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; on success it replaces `path` in one rename.

    Works for files and folders alike: the caller creates whatever it likes at the
    yielded path. On error the temporary is removed and `path` is left untouched; a
    full disk is reported as a DiskFullError naming `path`. Each output has one writer
    at a time, so temporaries of `path` found beside it were left by a writer that was
    killed: they are removed first (they may be what fills the disk).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for leftover in _temporaries(path):
        _remove(leftover)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            old = path.with_name(f".{path.name}.old")
            _remove(old)
            path.rename(old)
            tmp.rename(path)
            _remove(old)
        else:
            os.replace(tmp, path)
    except OSError as err:
        if err.errno in DISK_FULL:
            raise DiskFullError(f"{path}: not written, the disk is full ({err.strerror}); any previous version is kept") from None
        raise
    finally:
        _remove(tmp)


def _temporaries(path: Path) -> list[Path]:
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[0-9a-f]{{12}}\.tmp")
    return [p for p in path.parent.iterdir() if pattern.fullmatch(p.name)]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
