"""Run by test_training under torchrun (or alone): one training step's loss and gradients on a fixed global batch."""

import sys
from datetime import timedelta

import torch

from avse.config import from_dict
from avse.model.avse import build_model
from avse.training.distributed import init_distributed, shutdown
from avse.training.step import forward_backward

GLOBAL_BATCH = 8


def main(out_path: str, loss: str) -> None:
    ctx = init_distributed(timedelta(seconds=60))  # a hang stops with an error within a minute, however slow the machine
    config = from_dict({
        "data": {"img_res": 32},
        "model": {"keep_ratio": 1.0, "size_augment": False, "embed_size": 32, "block_dim": 16},
        "train": {"loss": loss, "batch_size": GLOBAL_BATCH // ctx.world_size, "decorrelation_weight": 0.5},
    })
    torch.manual_seed(0)
    model = build_model(config, vocab_size=50).to(ctx.device)
    for module in model.modules():  # dropout would differ between the two runs
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (GLOBAL_BATCH, 3, 32, 32), dtype=torch.uint8, generator=generator)
    input_ids = torch.randint(5, 50, (GLOBAL_BATCH, 7), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[::3, 5:] = 0
    groups = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5])  # some captions share an image
    b = config.train.batch_size
    local = slice(ctx.rank * b, (ctx.rank + 1) * b)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if ctx.distributed else model
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=False)
    objective, _ = forward_backward(ddp, model, tuple(t[local] for t in (images, input_ids, attention_mask, groups)),
                                    ctx, config, epoch=5, dtype=torch.float32, scaler=scaler)
    if ctx.is_main:
        grads = {name: p.grad.cpu() for name, p in model.named_parameters() if p.grad is not None}
        torch.save({"objective": float(objective), "grads": grads}, out_path)
    del ddp  # before the process group goes (`shutdown`)
    shutdown(ctx)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
