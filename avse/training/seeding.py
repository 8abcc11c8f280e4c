"""Where a run's randomness comes from, and the switches that make its arithmetic repeat exactly.

Every random draw of training (initial weights, augmentation, views, token drop, dropout)
comes from a seed derived from `train.seed` and the draw's position: what it is for, and
for per-batch draws the rank, epoch and batch (for an item's augmentation the epoch and
caption index, whatever the rank). The same run, resumed or not, with the loader in the
main process or in workers, therefore draws the same numbers.
"""

from __future__ import annotations

import enum
import hashlib
import os
import struct

import torch

# cuBLAS reuses workspaces across streams unless given a fixed one; with it, GEMMs repeat bitwise.
CUBLAS_WORKSPACE = ":4096:8"


class Draw(enum.IntEnum):
    """What a derived seed is for: part of the seed, so that two purposes never share a stream."""

    INIT = 0  # the model's initial weights
    BATCH = 1  # the random parts of one training batch's forward pass
    SHUFFLE = 2  # the order of an epoch's training captions
    AUGMENT = 3  # one training item's image augmentation, at (epoch, caption index)
    CAPTION = 4  # one training item's caption augmentation, derived from its AUGMENT seed


def derive_seed(seed: int, purpose: Draw, *position: int) -> int:
    """A 63-bit seed for `purpose` at `position`, the same on every machine, process and Python version
    (unlike `hash()`), and unrelated for neighbouring positions (unlike `seed + position`).

    A hash of the numbers as fixed-width words, so distinct inputs never share a seed by construction
    (NumPy's SeedSequence, for one, pads with zeros: `[1, 0]` and `[1]` give the same stream).
    """
    if seed < 0 or any(p < 0 for p in position):
        raise ValueError(f"seeds and positions are non-negative integers, got seed {seed}, position {position}")
    words = struct.pack(f"<{2 + len(position)}Q", seed, int(purpose), *position)
    return int.from_bytes(hashlib.sha256(words).digest()[:8], "little") >> 1


def seed_draws(seed: int, purpose: Draw, *position: int) -> None:
    """Seed torch's global generators (CPU and every GPU) for the draws at `position`.

    The global generators, not a private one, because HF backbones draw dropout from them.
    """
    torch.manual_seed(derive_seed(seed, purpose, *position))


def set_deterministic(enabled: bool, device: torch.device) -> None:
    """`enabled`: kernels that repeat bitwise for the same inputs, thread count and device model
    (`train.deterministic`); otherwise PyTorch's defaults.

    On a CPU PyTorch's kernels already repeat; `use_deterministic_algorithms` there is a
    guard that stops the run if an op without a deterministic kernel is ever added. On CUDA
    it also selects deterministic kernels (scatter, index_add, embedding backward), needs
    cuBLAS's fixed workspace (set here if the user has not, before any CUDA work), and leaves
    out cuDNN's attention. Training's forward passes take SDPA's math path (`compute.autocast`);
    no-grad evaluation keeps flash and memory-efficient attention, whose forward repeats. Bits
    repeat on the same GPU model, driver and library versions; other GPU models choose other kernels.
    """
    if device.type == "cuda":
        if enabled:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
        torch.backends.cudnn.deterministic = enabled
        torch.backends.cuda.enable_cudnn_sdp(not enabled)
    # On CUDA an op with no deterministic kernel warns rather than stopping a long GPU run.
    torch.use_deterministic_algorithms(enabled, warn_only=device.type == "cuda")
