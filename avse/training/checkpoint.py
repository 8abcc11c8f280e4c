"""Checkpoints: plain state dicts of tensors and numbers, written atomically, loaded with `weights_only=True`."""

from __future__ import annotations

import hashlib
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Sequence

import torch

from avse.config import OBSERVATION_KEYS, Config, stable_hash
from avse.errors import AvseError
from avse.io import atomic_path


# A checkpoint written under other values of these is still resumed: they say how long a run goes on or how
# it is observed, not what each step computes.
NOT_HASHED = OBSERVATION_KEYS | {"train.epochs", "train.max_steps"}


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
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a readable checkpoint (not a PyTorch archive: truncated, or the pre-1.6 format)")
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


def training_hash(config: Config, world_size: int, dtype: torch.dtype, prepared: Path, device: torch.device) -> str:
    """What a checkpoint must share with this run to be resumed: parameters (less run length and
    logging), the training data, the model, training and image-augmentation code, the process layout,
    the precision and the kind of device (a CPU run's optimiser state does not carry over to a GPU)."""
    flat = {k: v for k, v in config.flat().items() if k.split(".")[0] in ("data", "model", "train") and k not in NOT_HASHED}
    package = Path(__file__).resolve().parents[1]
    inputs = [prepared / "train.csv", package / "compute.py", *(package / "data" / name for name in ("augment.py", "dataset.py", "images.py")),
              *sorted((package / "model").glob("*.py")), *sorted((package / "training").glob("*.py"))]
    digests = {str(path.relative_to(path.parents[1])): hashlib.sha256(path.read_bytes()).hexdigest() for path in inputs}
    return stable_hash({"params": flat, "files": digests, "world_size": world_size, "dtype": str(dtype), "device": device.type})
