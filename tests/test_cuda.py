"""What only a CUDA GPU can show: these run on a machine with one, and are skipped elsewhere."""

import numpy as np
import pytest
import torch

from avse import compute
from avse.config import from_dict
from avse.data.dataset import PreparedSplit
from avse.evaluation import embed
from avse.model.avse import build_model
from avse.model.encoders import interpolate_positions
from avse.training.distributed import DistContext
from avse.training.step import forward_backward, optimizer_step
from avse.training.optim import build_optimizer
from avse.training.seeding import Draw, seed_draws, set_deterministic
from conftest import requires_cuda

pytestmark = requires_cuda
CUDA = torch.device("cuda", 0)


def test_auto_precision_is_bf16_exactly_where_the_gpu_has_it_natively():
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    assert compute.resolve_precision("auto", CUDA) == (torch.bfloat16 if native else torch.float16)


def test_position_interpolation_backward_runs_under_strict_deterministic_algorithms():
    """Bicubic upsampling's CUDA backward has no deterministic kernel; the matrix-product form needs none."""
    positions = torch.randn(1, 1 + 14 * 14, 32, device=CUDA, requires_grad=True)
    set_deterministic(True, CUDA)
    torch.use_deterministic_algorithms(True)  # strict: an op without a deterministic kernel raises instead of warning
    interpolate_positions(positions, 16, 16).sum().backward()
    grid = positions[:, 1:].reshape(1, 14, 14, 32).permute(0, 3, 1, 2)
    with pytest.raises(RuntimeError, match="does not have a deterministic implementation"):
        torch.nn.functional.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False).sum().backward()


@pytest.mark.parametrize("vision", ["vit-tiny", "swin-tiny"])
def test_training_steps_repeat_bitwise_on_the_gpu(vision):
    """`train.deterministic: true`: the same steps from the same seed give the same weights, in the default precision."""
    config = from_dict({"data": {"img_res": 64}, "model": {"vision": {"name": vision}, "embed_size": 64, "block_dim": 16},
                        "train": {"batch_size": 8, "loss": "hinge", "decorrelation_weight": 1.0}})
    ctx = DistContext(0, 0, 1, CUDA)
    dtype = compute.resolve_precision("auto", CUDA)
    set_deterministic(True, CUDA)
    generator = torch.Generator().manual_seed(0)
    batch = (torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8, generator=generator),
             torch.randint(5, 100, (8, 12), generator=generator), torch.ones(8, 12, dtype=torch.long), torch.arange(8))
    weights = []
    for _ in range(2):
        seed_draws(0, Draw.INIT)
        model = build_model(config, vocab_size=100).to(CUDA).train()
        optimizer = build_optimizer(model, config.train)
        scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
        for step in range(3):
            seed_draws(0, Draw.BATCH, 0, 0, step)
            forward_backward(model, model, batch, ctx, config, epoch=1, dtype=dtype, scaler=scaler)
            optimizer_step(model, optimizer, scaler, config.train.grad_clip)
        weights.append({name: value.detach().cpu() for name, value in model.state_dict().items()})
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])



def test_the_embed_stage_copies_pinned_image_batches(monkeypatch, tmp_path):
    """Asynchronous copies to the GPU need page-locked host memory."""
    pinned = []

    class RecordingLoader(embed.DataLoader):
        def __iter__(self):
            for images, indices in super().__iter__():
                pinned.append(images.is_pinned())
                yield images, indices

    monkeypatch.setattr(embed, "DataLoader", RecordingLoader)
    config = from_dict({"data": {"img_res": 32}, "model": {"vision": {"name": "vit-tiny"}, "embed_size": 32, "block_dim": 16}})
    model = build_model(config, vocab_size=50).to(CUDA)
    np.save(tmp_path / "images.npy", np.zeros((3, 32, 32, 3), dtype=np.uint8))
    split = PreparedSplit("test", ["a"] * 15, np.repeat(np.arange(3), 5), np.arange(3), [""] * 3, tmp_path / "images.npy")
    embedded = embed.encode_images(model, split, 32, 2, CUDA, resize=config.data.resize)
    assert embedded.device.type == "cpu" and embedded.shape[0] == 3 and pinned == [True, True]
