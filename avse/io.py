"""Atomic file output, one writer at a time: readers never see a half-written file or folder.

A writer holds its output's lock (`writer_lock`) while it works, and writes each output, or a set of outputs,
to temporary siblings that one rename each puts in place (`atomic_paths`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any, Iterator

from avse.errors import AvseError, DiskFullError, OutputBusyError, UnwritableError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; on success it replaces `path` in one rename (see `atomic_paths`)."""
    with atomic_paths(path) as (tmp,):
        yield tmp


@contextlib.contextmanager
def atomic_paths(*paths: str | os.PathLike) -> Iterator[list[Path]]:
    """Yield a temporary sibling of each of `paths`; once all are written, each replaces its path in one rename.

    Works for files and folders alike: the caller creates whatever it likes at the yielded
    paths. On error the temporaries are removed and every path is left untouched, so a set
    of outputs is all new or all as it was (but for a crash between its renames, which
    write nothing). A full disk is reported as a DiskFullError, a folder that cannot be
    written as an UnwritableError. Temporaries carry their writer's pid: those of `paths`
    whose writer is gone (killed) are removed first, as they may be what fills the disk;
    a live writer's are left alone.
    """
    paths = [Path(p) for p in paths]
    tmps: list[Path] = []
    try:
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            for leftover in _leftovers(path):
                _remove(leftover)
            tmps.append(_temporary(path))
        yield tmps
        for path, tmp in zip(paths, tmps):
            _replace(path, tmp)
    except OSError as err:
        failure = _write_failure(err, paths)
        if failure is None:
            raise
        raise failure from None
    finally:
        for tmp in tmps:
            _remove(tmp)


@contextlib.contextmanager
def writer_lock(output: str | os.PathLike) -> Iterator[None]:
    """Be the one writer of `output` while entered: another process that tries fails at once, with an OutputBusyError
    naming this one.

    The lock is an flock on `.<name>.lock` beside `output`, which the kernel releases when its holder ends, however
    it ends; the holder removes the file on the way out, and the folders it made for it if nothing else came into them.
    """
    output = Path(output)
    lock_path = output.parent / f".{output.name}.lock"
    made = [folder for folder in (output.parent, *output.parent.parents) if not folder.exists()]
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock = _lock(lock_path, output)
    except OSError as err:
        failure = _write_failure(err, [output])
        if failure is None:
            raise
        raise failure from None
    try:
        yield
    finally:
        lock_path.unlink(missing_ok=True)  # while still held, so that no one locks the file being removed
        os.close(lock)
        for folder in made:  # innermost first; one that holds anything stays
            with contextlib.suppress(OSError):
                folder.rmdir()


def _lock(lock_path: Path, output: Path) -> int:
    """An open descriptor of `lock_path` holding its flock, with this process named in it for another writer's message."""
    while True:
        lock = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(lock, 4096).decode(errors="replace").strip() or "another process"
            os.close(lock)
            raise OutputBusyError(f"{output}: already being written by {holder}; wait for it to finish, or stop it") from None
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(lock), os.stat(lock_path)):
                break
        os.close(lock)  # its previous holder removed it between our open and our lock: lock the one there now
    try:
        os.ftruncate(lock, 0)  # a killed holder's name may still be there
        os.write(lock, f"pid {os.getpid()} ({' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])})".encode())
    except OSError:
        os.close(lock)
        raise
    return lock


def _write_failure(err: OSError, paths: list[Path]) -> AvseError | None:
    """One line for `err`, met while writing `paths`: a full disk, or a folder of theirs that cannot be written
    (None for any other error, or one about another file, such as an input)."""
    if err.errno in DISK_FULL:
        return DiskFullError(f"{', '.join(map(str, paths))}: not written, the disk is full ({err.strerror}); any previous version is kept")
    if err.errno in NOT_WRITABLE and err.filename is not None:
        where = Path(err.filename)
        for path in paths:
            if where == path.parent or path.parent in where.parents or where in path.parent.parents:
                return UnwritableError(f"{path}: not written, cannot write in {path.parent} ({err.strerror}); any previous version is kept")
    return None


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def _leftovers(path: Path) -> list[Path]:
    """The temporaries of `path` whose writer has ended (one that was killed cannot remove them)."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.[0-9a-f]{{8}}\.tmp")
    found = [(p, pattern.fullmatch(p.name)) for p in path.parent.iterdir()]
    return [p for p, match in found if match and not _running(int(match.group(1)))]


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _replace(path: Path, tmp: Path) -> None:
    if path.is_dir() and not path.is_symlink():  # a folder cannot replace another in one rename: the old one goes aside
        old = _temporary(path)
        path.rename(old)
        tmp.rename(path)
        _remove(old)
    else:
        os.replace(tmp, path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json_text(obj))


def json_text(obj: Any) -> str:
    """`obj` as the JSON the pipeline's metrics files hold: indented, keys sorted."""
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"
