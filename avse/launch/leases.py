"""GPU leases: one experiment per GPU when several run side by side on one machine (`train.gpus: auto`).

DVC's queue (`dvc queue start -j N`) starts experiments that each see every GPU and would all train on the first:
the queue tells an experiment nothing about which GPU is its own. With a lease, a run takes `train.nproc_per_node`
GPUs that no other run holds, before CUDA starts in it, and waits while too few are free. A lease is an exclusive
`flock` on a file per GPU in a folder every run on the machine shares: the kernel gives it back when the run ends,
however it ends (a kill included), so a dead run never keeps a GPU.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from avse.errors import ConfigError

log = logging.getLogger("avse.train")

LEASE_DIR_VARIABLE = "AVSE_GPU_LEASES"  # where the lease files are, if not in the system's temporary folder
WAIT_SECONDS = 5.0


def lease_dir() -> Path:
    return Path(os.environ.get(LEASE_DIR_VARIABLE) or Path(tempfile.gettempdir()) / "avse-gpu-leases")


def leasable_gpus() -> list[str]:
    """The GPUs a lease may take: those `CUDA_VISIBLE_DEVICES` names (a scheduler's allocation), else those `nvidia-smi`
    lists; found without starting CUDA in this process, which would fix its visible devices."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [device.strip() for device in visible.split(",") if device.strip()]
    try:
        listed = subprocess.run(["nvidia-smi", "--list-gpus"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(index) for index, line in enumerate(line for line in listed.splitlines() if line.startswith("GPU "))]


@contextlib.contextmanager
def gpu_lease(count: int, devices: list[str], folder: Path | None = None, wait_seconds: float = WAIT_SECONDS) -> Iterator[list[str]]:
    """Hold `count` of `devices` (GPU ids) that no other lease holds, waiting while fewer are free; yields their ids."""
    if count > len(devices):
        raise ConfigError(f"train.gpus: auto leases train.nproc_per_node = {count} GPUs, but there are {len(devices)}")
    folder = folder or lease_dir()
    folder.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        held: list[tuple[str, int]] = []
        for device in devices:
            descriptor = os.open(folder / f"gpu-{device}.lock", os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(descriptor)
                continue
            held.append((device, descriptor))
            if len(held) == count:
                break
        if len(held) == count:
            break
        for _, descriptor in held:
            os.close(descriptor)  # closing gives the lock back
        if not waited:
            log.info("waiting for %d free GPU(s) of %d (leases in %s)", count, len(devices), folder)
            waited = True
        time.sleep(wait_seconds)
    try:
        yield [device for device, _ in held]
    finally:
        for _, descriptor in held:
            os.close(descriptor)


@contextlib.contextmanager
def leased_visible_gpus(count: int) -> Iterator[list[str]]:
    """While held, `CUDA_VISIBLE_DEVICES` names `count` leased GPUs (none leased on a machine without GPUs)."""
    devices = leasable_gpus()
    if not devices:
        yield []
        return
    with gpu_lease(count, devices) as leased:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(leased)
        log.info("train.gpus: auto: leased GPU(s) %s", ", ".join(leased))
        yield leased
