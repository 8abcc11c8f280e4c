"""How tensors are computed on this machine: numeric precision, mixed-precision contexts, threads, the host allocator."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
# glibc's largest mmap threshold on 64-bit systems: blocks up to this size come from the heap.
_MAX_MMAP_THRESHOLD = 32 * 2**20


def cpu_has_fast_bf16() -> bool:
    """bf16 matrix units (AVX512-BF16 or AMX): without them bf16 matmuls on a CPU are far slower than fp32."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 where the hardware runs it fast, fp16 on older GPUs, else fp32."""
    if precision != "auto":
        return PRECISIONS[precision]
    if device.type == "cuda":
        # Emulated bf16 (V100, T4) is slow: those GPUs train in fp16 with loss scaling.
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def autocast(device: torch.device, dtype: torch.dtype, deterministic: bool = False):
    """Mixed precision for the forward pass (`float32` is none), and the attention kernels that fit it.

    A forward pass that records gradients runs attention through SDPA's math backend
    - on CPUs in bf16: its matmuls use the bf16 matrix units, while the fused CPU kernel's backward
      is several times slower in bf16 than in fp32 (`benchmarks/README.md`, training step);
    - on GPUs under `deterministic` (`train.deterministic`): the fused kernels' backward may add
      partial gradients in varying order.
    Without gradients (embedding, evaluation) the fused kernels run: their forward is the faster one,
    and on GPUs it repeats bitwise too (flash and memory-efficient attention; PyTorch's reproducibility
    notes), where the math path would hold every `[batch, heads, tokens, tokens]` score matrix.
    """
    contexts = contextlib.ExitStack()
    if dtype != torch.float32:
        contexts.enter_context(torch.autocast(device.type, dtype=dtype))
    if torch.is_grad_enabled() and ((device.type == "cpu" and dtype != torch.float32) or (device.type == "cuda" and deterministic)):
        contexts.enter_context(sdpa_kernel(SDPBackend.MATH))
    return contexts


def recompute_as_forward() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """Contexts of activation checkpointing (`torch.utils.checkpoint`'s `context_fn`): (forward, recomputation).

    The recomputation runs in the backward pass, outside the `sdpa_kernel` context that chose
    the forward pass's attention kernels (see `autocast`): it must use the same kernels, or it
    computes other tensors than the ones the forward pass saved.
    """
    backends = {SDPBackend.MATH: torch.backends.cuda.math_sdp_enabled, SDPBackend.FLASH_ATTENTION: torch.backends.cuda.flash_sdp_enabled,
                SDPBackend.EFFICIENT_ATTENTION: torch.backends.cuda.mem_efficient_sdp_enabled,
                SDPBackend.CUDNN_ATTENTION: torch.backends.cuda.cudnn_sdp_enabled}
    return contextlib.nullcontext(), sdpa_kernel([backend for backend, enabled in backends.items() if enabled()])


def set_threads(requested: int) -> int:
    """Set this process's CPU threads (`train.threads`) and return how many: `requested`, or for 0 the cores this
    process may run on divided by the processes on its node (torchrun's `LOCAL_WORLD_SIZE`).

    Set here rather than left to the launcher: torchrun sets one thread only for several processes a node, so two
    single-process nodes on one machine would each take every core, and the thread count changes the rounding.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = requested or max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(threads)
    return threads


def retain_freed_memory() -> bool:
    """Keep freed host memory in the process (glibc only) instead of returning it to the OS.

    By default glibc serves every block over a few MB with a fresh mmap and unmaps it on
    free, so a training step that allocates the same activations again pays page faults
    and zero-filling for each one: about a fifth of the embedded default's CPU step. With
    this, such blocks come from the heap, which is not trimmed. Peak memory is unchanged;
    memory is returned when the process ends. Returns whether the settings took effect.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = {_M_MMAP_THRESHOLD: _MAX_MMAP_THRESHOLD, _M_TRIM_THRESHOLD: 2**31 - 1, _M_TOP_PAD: 256 * 2**20}
    applied = all(mallopt(option, value) == 1 for option, value in settings.items())
    if not applied:
        log.debug("mallopt refused the allocator settings; freed memory goes back to the OS")
    return applied
