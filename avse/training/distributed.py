"""Process-group setup under torchrun, and gathering embeddings with their gradients."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from avse.errors import AvseError, ConfigError

DEFAULT_TIMEOUT = timedelta(minutes=30)  # train.dist_timeout_minutes


class CollectiveTimeout(AvseError):
    """A process waited for the others longer than the process group's timeout."""


@dataclass(frozen=True)
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    timeout: timedelta = DEFAULT_TIMEOUT  # how long a collective waits for the other processes
    # A gloo group for the project's own waits (`barrier`), whatever the backend of the collectives: NCCL's
    # collectives return at once, and at its timeout NCCL's watchdog ends the process without a word.
    waits: dist.ProcessGroup | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def check_devices(nproc_per_node: int) -> None:
    """One GPU per process: refuse more processes than GPUs before anything starts."""
    if torch.cuda.is_available() and nproc_per_node > torch.cuda.device_count():
        raise ConfigError(
            f"train.nproc_per_node: {nproc_per_node} processes but only {torch.cuda.device_count()} GPUs "
            "(NCCL needs one GPU per process)"
        )


def init_distributed(timeout: timedelta = DEFAULT_TIMEOUT) -> DistContext:
    """Join the torchrun process group (NCCL on GPUs, gloo on CPUs), or run as a single process.

    `timeout` bounds every wait for the other processes (`train.dist_timeout_minutes`), NCCL's
    default included: past it a process waiting at a `barrier` stops with an error naming the parameter.
    """
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return DistContext(0, 0, 1, device)
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        store, rank, world_size = next(dist.rendezvous("env://"))
        # torchrun keeps its store across restarts (--max-restarts): without a prefix per attempt, the
        # processes of a restarted job find the addresses of the dead ones and cannot connect.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend, store=dist.PrefixStore(f"attempt{attempt}", store), rank=rank, world_size=world_size,
                                timeout=timeout)
    waits = dist.new_group(backend="gloo", timeout=timeout)
    return DistContext(dist.get_rank(), local_rank, dist.get_world_size(), device, timeout, waits)


@contextlib.contextmanager
def waiting_for_the_others(ctx: DistContext, what: str):
    """Turn a collective's timeout into one message that says what was waited for and which parameter bounds it."""
    try:
        yield
    except RuntimeError as err:  # gloo's and NCCL's timeouts (DistBackendError is a RuntimeError)
        message = str(err).lower()
        if "timed out" not in message and "failed to pass monitoredbarrier" not in message:
            raise
        minutes = ctx.timeout.total_seconds() / 60
        raise CollectiveTimeout(
            f"process {ctx.rank} waited more than train.dist_timeout_minutes ({minutes:g}) for the other processes {what}: "
            "one of them died or hangs, or the first process's dev evaluation or checkpointing takes longer (raise the parameter)"
        ) from None


def gather_batch(x: Tensor, ctx: DistContext) -> Tensor:
    """`[b, ...]` on each rank -> `[world * b, ...]` in rank order; gradients flow only to this rank's part.

    Every rank then computes the same objective on the whole batch, and each rank back-propagates
    through the part it encoded. That part carries `world_size` times its gradient, because DDP
    averages the ranks' gradients; parameters used after the gather (the temperature) get their
    whole gradient on every rank, which the average leaves as it is. No collective runs inside the
    backward pass, where it would interleave with DDP's own gradient all-reduce.
    """
    if not ctx.distributed:
        return x
    parts = [torch.empty_like(x) for _ in range(ctx.world_size)]
    with waiting_for_the_others(ctx, "to gather the batch's embeddings"):
        dist.all_gather(parts, x.detach().contiguous())
    if x.requires_grad:
        own = x.detach()
        parts[ctx.rank] = own + (x - own) * ctx.world_size  # the value of x, with the gradient scaled
    return torch.cat(parts)


def all_reduce_sum(x: Tensor, ctx: DistContext) -> Tensor:
    if ctx.distributed:
        x = x.clone()
        with waiting_for_the_others(ctx, "to sum the loss"):
            dist.all_reduce(x)
    return x


def barrier(ctx: DistContext, what: str = "at a barrier") -> None:
    """Wait for every process, on the gloo group: a process that never comes stops the others with the named error
    after `ctx.timeout`, under NCCL too."""
    if ctx.distributed:
        with waiting_for_the_others(ctx, what):
            dist.monitored_barrier(group=ctx.waits, timeout=ctx.timeout)


def shutdown(ctx: DistContext) -> None:
    """Leave the process group together: a rank destroying it while another still talks can hang gloo.

    Release the DistributedDataParallel wrapper first. Its reducer holds the group too, and if the reducer
    drops the last reference, the group is destroyed with the GIL held. Gloo's worker threads may still need
    the GIL to free their last work, so the process would hang at exit (pytorch/pytorch#56297).
    """
    if ctx.distributed and dist.is_initialized():
        barrier(ctx, "to finish together")
        dist.destroy_process_group()
