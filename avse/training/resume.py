"""What a checkpoint must share with a run for the run to resume from it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from avse.config import OBSERVATION_KEYS, Config, stable_hash

# A checkpoint written under other values of these is still resumed: they say how long a run goes on or how
# it is observed, not what each step computes.
NOT_HASHED = OBSERVATION_KEYS | {"train.epochs", "train.max_steps"}


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
