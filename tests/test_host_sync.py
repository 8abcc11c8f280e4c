"""A training step never waits on the host: nothing in it reads a tensor's value back, but the one decision per
optimiser step (`optimizer_step`: are the gradients and the objective finite?).

On a GPU such a read stops the host until the device has caught up, so the GPU idles while Python queues the next
kernels. On the CPU the same reads are caught by making the Tensor methods that perform them raise.
"""

import contextlib
import sys
from pathlib import Path

import pytest
import torch

from avse.model.avse import build_model
from avse.training.distributed import DistContext
from avse.training.optim import build_optimizer
from avse.training.step import forward_backward, optimizer_step
from tests.conftest import make_config

# The Tensor methods that copy a value to the host (int(), float() and bool() of a tensor call the dunders).
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")
CPU = torch.device("cpu")


# A packed sequence's batch sizes live on the host on every device (`PackedSequence.batch_sizes`); torch's RNN code
# reads them there.
HOST_METADATA_READERS = (str(Path(torch.nn.modules.rnn.__file__)), str(Path(torch.nn.utils.rnn.__file__)))


@contextlib.contextmanager
def host_reads_forbidden(allowed_in: str, host_tensors=lambda: []):
    """Every host read raises, except one made directly by the function named `allowed_in` (counted in the yielded
    list), reads of the tensors `host_tensors()` names and of packed sequences' batch sizes, which a GPU run keeps
    on the host too."""
    allowed: list[str] = []

    def guarded(name: str, original):
        def read(tensor, *args, **kwargs):
            caller = sys._getframe(1)
            if any(tensor is kept for kept in host_tensors()) or caller.f_code.co_filename in HOST_METADATA_READERS:
                return original(tensor, *args, **kwargs)
            if caller.f_code.co_name == allowed_in:
                allowed.append(name)
                return original(tensor, *args, **kwargs)
            raise AssertionError(f"Tensor.{name} reads a value back to the host at {caller.f_code.co_filename}:{caller.f_lineno}")
        return read

    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}
    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, guarded(name, original))
        yield allowed
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def optimizer_step_counters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """AdamW's step counts: tensors on the host whatever the device (unless `capturable`), read for bias correction."""
    return [state["step"] for state in optimizer.state.values() if "step" in state]


@pytest.mark.parametrize("options", [
    {"train": {"loss": "infonce"}},
    {"train": {"loss": "hinge", "decorrelation_weight": 0.5, "grad_accum": 2}, "model": {"matching": "sinkhorn"}},
    {"train": {"precision": "fp16"}, "model": {"views": 1, "size_augment": False}},
], ids=["infonce", "hinge-sinkhorn-accumulated", "fp16-scaler"])
def test_a_training_step_reads_one_value_back_per_optimiser_step(options):
    """The verdict (gradients finite? a stop requested?) is read once, as one list."""
    tree = {"data": {"img_res": 32}, "model": {"vision": {"name": "vit-tiny"}, "embed_size": 32, "block_dim": 16},
            "train": {"batch_size": 6}}
    for section, values in options.items():
        tree[section] = tree.get(section, {}) | values
    config = make_config(tree)
    dtype = {"fp16": torch.float16}.get(config.train.precision, torch.float32)
    torch.manual_seed(0)
    model = build_model(config, vocab_size=50).train()
    optimizer = build_optimizer(model, config.train)
    scaler = torch.amp.GradScaler("cpu", enabled=dtype == torch.float16)
    ctx = DistContext(0, 0, 1, CPU)
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=generator)
    input_ids = torch.randint(5, 50, (6, 9), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[::2, 4:] = 0  # captions of several lengths
    batch = (images, input_ids, attention_mask, torch.tensor([0, 0, 1, 2, 3, 4]))

    for step in range(2):  # the second step runs with the optimiser's state in place
        with host_reads_forbidden("optimizer_step", lambda: optimizer_step_counters(optimizer)) as allowed:
            objective = None
            for _ in range(config.train.grad_accum):
                loss, stop_requests = forward_backward(model, model, batch, ctx, config, epoch=1, dtype=dtype, scaler=scaler,
                                                       loss_scale=1 / config.train.grad_accum, stop=step == 1)
                objective = loss if objective is None else objective + loss
            verdict = optimizer_step(model, optimizer, scaler, config.train.grad_clip, objective, stop_requests)
        assert allowed == ["tolist"], f"step {step}"
        assert torch.isfinite(objective) and verdict.stop == (step == 1)
        assert verdict.applied or scaler.is_enabled()  # fp16's first scale may overflow the gradients: the scaler skips and lowers it


def test_the_guard_catches_the_reads_a_step_used_to_make():
    """The guard itself: `float()`, `bool()`, `.item()` and `.cpu()` of a tensor all raise under it."""
    x = torch.ones(2)
    with host_reads_forbidden("nowhere"):
        for read in (lambda: float(x.sum()), lambda: bool(torch.isfinite(x).all()), lambda: x.sum().item(), lambda: x.cpu()):
            with pytest.raises(AssertionError, match="reads a value back to the host"):
                read()
