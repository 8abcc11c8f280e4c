"""Training step throughput: this package's step against the official code's step, same model, same batch.

The baseline re-implements how the official AVSE code runs a step: eager attention,
the views one after another through the encoder, size augmentation as a per-sample
Python loop, the similarity through a `[B, B, views * blocks, blocks]` einsum, fp32,
and the optimiser's per-tensor loop. Ours is `forward_backward` + `optimizer_step`
of the train stage. Both get the same weights and the same batch, and their steps
alternate, so a busy machine slows both alike.

    python benchmarks/training_step.py                       # ViT-B/16 224 + BERT-base, batch 8, CPU, fp32
    python benchmarks/training_step.py --precision auto      # ours in the default precision (bf16 where fast)
    python benchmarks/training_step.py --tiny                # seconds: the embedded default's small backbones
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
import torch.nn.functional as F

from avse.compute import resolve_precision, retain_freed_memory
from avse.config import load_config
from avse.model.avse import AVSE, build_model
from avse.model.sampling import gather_views, keep_count, radial_bias_indices, view_centres
from avse.training.distributed import DistContext
from avse.training.dry_run import random_batch
from avse.training.step import forward_backward, optimizer_step
from avse.training.optim import build_optimizer

FULL_SIZE = ["model.vision.name=google/vit-base-patch16-224-in21k", "model.text.name=bert-base-uncased",
             "model.embed_size=1024", "model.block_dim=256", "data.img_res=224", "train.batch_size=8"]
TINY = ["train.batch_size=8"]
COMMON = ["model.vision.init=random", "model.text.init=random", "model.views=2", "model.keep_ratio=0.8", "train.loss=hinge",
          "train.warmup_epochs=0"]


def official_image_embedding(model: AVSE, images: torch.Tensor) -> torch.Tensor:
    """`[B, V * E]` as the official code computes it: one encoder pass per view, a Python loop per sample."""
    enc, vit = model.image_encoder, model.image_encoder.backbone
    tokens = vit.embeddings(enc.normalize_pixels(images), interpolate_pos_encoding=enc.interpolate)
    keep = keep_count(enc.keep_ratio, enc.grid, enc.grid, "tokens", enc.num_prefix)
    centres = view_centres(images.size(0), enc.views, enc.grid, enc.grid, train=True, at_patches=True, device=images.device)
    indices = radial_bias_indices(centres, enc.grid, enc.grid, keep, noise=False)  # [B, V, k], the official nearest patches
    pooled = []
    for view in range(enc.views):
        hidden = gather_views(tokens, indices[:, view : view + 1], enc.num_prefix)  # [B, 1 + k, hidden]
        for layer in vit.layers:
            hidden = layer(hidden)
        features, lengths = [], []
        keep_draws, sample_draws = np.random.rand(*hidden.shape[:2]), np.random.rand(hidden.size(0))
        for i in range(hidden.size(0)):  # the official size augmentation
            if sample_draws[i] > 0.2:
                kept = hidden[i][np.where(keep_draws[i] > 0.2 * sample_draws[i])]
                features.append(torch.cat([kept, kept.new_zeros(hidden.size(1) - len(kept), hidden.size(2))]))
                lengths.append(len(kept))
            else:
                features.append(hidden[i])
                lengths.append(hidden.size(1))
        stacked = torch.stack(features)[:, : max(lengths)]
        out, _ = enc.gpo(enc.proj(stacked), torch.tensor(lengths))
        pooled.append(F.normalize(out, dim=-1))
    return torch.cat(pooled, dim=1)


def official_loss(model: AVSE, img: torch.Tensor, cap: torch.Tensor, margin: float) -> torch.Tensor:
    """Hardest-negative hinge over the einsum similarity, plus the official decorrelation term."""
    block = model.block_dim
    img_blocks = F.normalize(torch.stack(img.split(block, dim=1), dim=1), dim=-1)  # [B, 2n, block]
    cap_blocks = F.normalize(torch.stack(F.normalize(cap, dim=-1).split(block, dim=1), dim=1), dim=-1)  # [B, n, block]
    sims = torch.einsum("avc,btc->abvt", img_blocks, cap_blocks).max(dim=-2)[0].sum(dim=-1)  # [B, B]
    diagonal = sims.diag().view(-1, 1)
    mask = torch.eye(sims.size(0), dtype=torch.bool)
    cost_cap = (margin + sims - diagonal).clamp(min=0).masked_fill(mask, 0).max(dim=1)[0]
    cost_im = (margin + sims - diagonal.t()).clamp(min=0).masked_fill(mask, 0).max(dim=0)[0]
    views = img.chunk(2, dim=-1)
    c = F.normalize(views[0], dim=0).T @ F.normalize(views[1], dim=0) / img.size(0)
    off_diagonal = c.flatten()[:-1].view(c.size(0) - 1, c.size(0) + 1)[:, 1:]
    return cost_cap.sum() + cost_im.sum() + (c.diagonal() - 1).pow(2).sum() + 0.0051 * off_diagonal.pow(2).sum()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps of each (after one warm-up step)")
    parser.add_argument("--precision", default="fp32", help="precision of our step: fp32, bf16 or auto (the default of train.precision)")
    parser.add_argument("--tiny", action="store_true", help="the embedded default's backbones instead of ViT-B/16 + BERT-base")
    args = parser.parse_args()
    retain_freed_memory()  # as the train stage does; the baseline step benefits alike

    config = load_config(overrides=(TINY if args.tiny else FULL_SIZE) + COMMON + [f"train.precision={args.precision}"])
    device = torch.device("cpu")
    ctx = DistContext(rank=0, local_rank=0, world_size=1, device=device)
    dtype = resolve_precision(config.train.precision, device)
    torch.manual_seed(0)
    ours = build_model(config, config.data.vocab_size).train()
    baseline = copy.deepcopy(ours)
    for backbone in (baseline.image_encoder.backbone, baseline.text_encoder.backbone):
        backbone.config._attn_implementation = "eager"
    our_optimizer = build_optimizer(ours, config.train)
    baseline_optimizer = torch.optim.AdamW(baseline.parameters(), lr=config.train.lr, foreach=False)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batch = random_batch(config, config.data.vocab_size, device)
    images, input_ids, attention_mask, _ = batch

    def our_step() -> None:
        forward_backward(ours, ours, batch, ctx, config, epoch=1, dtype=dtype, scaler=scaler)
        optimizer_step(ours, our_optimizer, scaler, config.train.grad_clip)

    def baseline_step() -> None:
        img = official_image_embedding(baseline, images)
        cap = baseline.encode_text(input_ids, attention_mask)
        official_loss(baseline, img, cap, config.train.margin).backward()
        torch.nn.utils.clip_grad_norm_(baseline.parameters(), config.train.grad_clip)
        baseline_optimizer.step()
        baseline_optimizer.zero_grad()

    timings: dict[str, list[float]] = {"ours": [], "baseline": []}
    for step in range(args.steps + 1):  # step 0 warms up allocators and kernels, untimed
        for name, run in (("baseline", baseline_step), ("ours", our_step)):
            start = time.perf_counter()
            run()
            if step:
                timings[name].append(time.perf_counter() - start)
    pairs = config.train.batch_size
    median = {name: float(np.median(t)) for name, t in timings.items()}
    print(f"{config.model.vision.name} + {config.model.text.name}, batch {pairs}, {config.model.views} views of "
          f"{config.model.keep_ratio:.0%} patches, {torch.get_num_threads()} threads, median of {args.steps} steps")
    print(f"  {'official-style step (fp32, eager)':<34}{median['baseline']:8.3f} s  {pairs / median['baseline']:7.2f} pairs/s")
    ours_label = f"our step ({str(dtype).removeprefix('torch.')}, views batched)"
    print(f"  {ours_label:<34}{median['ours']:8.3f} s  {pairs / median['ours']:7.2f} pairs/s")
    print(f"  {'ratio':<34}{median['baseline'] / median['ours']:8.2f}x")


if __name__ == "__main__":
    main()
