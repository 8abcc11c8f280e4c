"""Checkpoints: plain state dicts of tensors and numbers, written atomically, loaded with `weights_only=True`."""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Sequence

import torch

from avse.errors import AvseError
from avse.io import atomic_path


class CheckpointError(AvseError):
    """A checkpoint is missing, corrupt, or holds more than plain tensors and numbers."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint holds pickled objects whose loading would run code from the file."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write `state`; a crash or a full disk mid-write leaves the previous file at `path` intact."""
    with atomic_path(path) as tmp:
        save_tensors(state, tmp)


def save_tensors(obj: Any, path: str | Path) -> None:
    """`torch.save` through a Python file, so that a failed write (a full disk) raises its OSError, which
    `atomic_path` reports clearly; torch's own file writer turns it into an opaque RuntimeError."""
    with open(path, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as err:
            # After a failed write torch still tries to finish the archive, and that error replaces the first.
            if isinstance(err.__context__, OSError):
                raise err.__context__ from None
            raise


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", *, allowed: Sequence[type] = (), trusted: bool = False
) -> dict[str, Any]:
    """Load a checkpoint without executing any pickled code.

    `allowed`: classes accepted beyond tensors and plain values (rebuilt from their
    attributes, no code run); `trusted`: unpickle anything, which runs code from the file.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with zipfile.ZipFile(path) as archive:
            unpacked = sum(entry.file_size for entry in archive.infolist())
    except (zipfile.BadZipFile, OSError):
        raise CheckpointError(f"{path}: not a readable checkpoint (not a PyTorch archive: truncated, or the pre-1.6 format)") from None
    # torch.save stores its entries uncompressed, so they never declare more bytes than the file has; a
    # compressed archive (a zip bomb) would unpack into memory before any check of its tensors.
    size = path.stat().st_size
    if unpacked > size:
        raise CheckpointError(f"{path}: refused to load: its entries unpack to {unpacked} bytes from a file of {size} "
                              f"(torch.save writes them uncompressed)")
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=not trusted)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        raise UnsafeCheckpointError(
            f"{path}: refused to load: it holds pickled Python objects{f' ({found.group(1)})' if found else ''}, not only tensors"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable checkpoint ({str(err).splitlines()[0][:160]})") from None
