"""Checkpoints: plain state dicts of tensors and numbers, written atomically, loaded with `weights_only=True`."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from avse.errors import AvseError
from avse.io import atomic_path


class CheckpointError(AvseError):
    """A checkpoint is missing, corrupt, or holds more than plain tensors and numbers."""


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


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint without executing any pickled code."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a readable checkpoint (not a PyTorch archive: truncated, or the pre-1.6 format)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused to load: it holds pickled Python objects, not only tensors "
            f"({str(err).splitlines()[0][:160]})"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable checkpoint ({str(err).splitlines()[0][:160]})") from None
