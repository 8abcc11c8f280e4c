"""Time exact AVSE scoring (``meta_similarity``) against a plain GEMM and the shard-by-shard way.

Run with the package installed (``make install``)::

    python benchmarks/scoring.py                    # 1000 images x 5000 captions
    python benchmarks/scoring.py --size coco5k      # 5000 images x 25000 captions
    python benchmarks/scoring.py --device cuda

Embeddings are random: image 2048-d, caption 1024-d, blocks of 256 (8 image blocks,
4 text blocks), fp32. Three ways are timed, round-robin so that load on the machine
hits them alike; the table gives the best and the median of the rounds.

- ``meta_similarity``: blocks normalised once, tiles of one GEMM and two reductions.
- ``one GEMM, same FLOPs``: ``[N * 8, 256] @ [256, M * 4]`` on random data, the cost
  of the block cosines alone; once into a new tensor (``a @ b``) and once into a
  preallocated one (``out=``), which spares the page faults of a fresh large output.
  At ``coco5k`` its 16 GB output does not fit, so it is timed on the rows of 1000
  images and multiplied by the number of such slabs.
- ``256 x 256 shards``: the reference evaluation's way; each shard of 256 images by
  256 captions splits and stacks its own blocks, normalises them, takes all block
  cosines with ``einsum``, then the max over image blocks and the sum over text blocks.
"""

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from avse.model.similarity import meta_similarity

SIZES = {"1k5k": (1000, 5000), "coco5k": (5000, 25000)}
IMAGE_DIM, CAPTION_DIM, BLOCK_DIM = 2048, 1024, 256
SHARD_SIZE = 256
GEMM_SLAB_IMAGES = 1000


def shard_by_shard_scores(img: Tensor, cap: Tensor, block_dim: int, shard_size: int = SHARD_SIZE) -> Tensor:
    """``[N, M]`` meta-similarity, shard by shard, blocks split and normalised inside the loop."""
    sims = torch.empty(img.size(0), cap.size(0), device=img.device)
    for img_start in range(0, img.size(0), shard_size):
        for cap_start in range(0, cap.size(0), shard_size):
            img_shard = img[img_start : img_start + shard_size]  # [si, Di]
            cap_shard = cap[cap_start : cap_start + shard_size]  # [sj, Dt]
            img_blocks = F.normalize(torch.stack(img_shard.split(block_dim, dim=1), dim=1), dim=-1)  # [si, nv, b]
            cap_blocks = F.normalize(torch.stack(cap_shard.split(block_dim, dim=1), dim=1), dim=-1)  # [sj, nt, b]
            block_cos = torch.einsum("ivd,jtd->ijvt", img_blocks, cap_blocks)  # [si, sj, nv, nt]
            sims[img_start : img_start + shard_size, cap_start : cap_start + shard_size] = (
                block_cos.max(dim=2).values.sum(dim=2)
            )
    return sims


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="1k5k")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after one warm-up round")
    parser.add_argument("--chunk-size", type=int, default=None, help="meta_similarity tile side (default: its own)")
    args = parser.parse_args()

    device = torch.device(args.device)
    n_images, n_captions = SIZES[args.size]
    n_views, n_text_blocks = IMAGE_DIM // BLOCK_DIM, CAPTION_DIM // BLOCK_DIM
    generator = torch.Generator().manual_seed(0)
    img = torch.randn(n_images, IMAGE_DIM, generator=generator).to(device)
    cap = torch.randn(n_captions, CAPTION_DIM, generator=generator).to(device)

    gemm_images = min(n_images, GEMM_SLAB_IMAGES)
    gemm_slabs = n_images / gemm_images
    gemm_left = torch.randn(gemm_images * n_views, BLOCK_DIM, generator=generator).to(device)
    gemm_right = torch.randn(BLOCK_DIM, n_captions * n_text_blocks, generator=generator).to(device)
    chunk_kwargs = {} if args.chunk_size is None else {"chunk_size": args.chunk_size}
    gemm_out = torch.empty(gemm_left.size(0), gemm_right.size(1), device=device)
    gemm_label = "one GEMM, same FLOPs" if gemm_slabs == 1 else f"GEMM, same FLOPs ({gemm_slabs:g} slabs)"
    methods: dict[str, tuple[Callable[[], object], float]] = {
        "meta_similarity": (lambda: meta_similarity(img, cap, BLOCK_DIM, **chunk_kwargs), 1.0),
        gemm_label: (lambda: gemm_left @ gemm_right, gemm_slabs),
        f"{gemm_label}, out=": (lambda: torch.matmul(gemm_left, gemm_right, out=gemm_out), gemm_slabs),
        f"{SHARD_SIZE} x {SHARD_SIZE} shards": (lambda: shard_by_shard_scores(img, cap, BLOCK_DIM), 1.0),
    }

    with torch.no_grad():
        torch.testing.assert_close(
            meta_similarity(img, cap, BLOCK_DIM, **chunk_kwargs), shard_by_shard_scores(img, cap, BLOCK_DIM)
        )
        times: dict[str, list[float]] = {name: [] for name in methods}
        for round_index in range(args.rounds + 1):
            for name, (fn, scale) in methods.items():
                seconds = timed(fn, device) * scale
                if round_index:  # round 0 warms up allocator, caches and kernels
                    times[name].append(seconds)

    flops = 2 * n_images * n_views * n_captions * n_text_blocks * BLOCK_DIM
    gemm_best = min(times[gemm_label])
    gemm_out_best = min(times[f"{gemm_label}, out="])
    print(f"{args.size}: {n_images} x {n_captions}, image {IMAGE_DIM}-d, caption {CAPTION_DIM}-d, block {BLOCK_DIM}, "
          f"fp32, {device}, {torch.get_num_threads()} CPU threads, {args.rounds} rounds, {flops / 1e9:.1f} GFLOP")
    print(f"{'method':36s} {'best s':>8s} {'median s':>9s} {'GFLOP/s':>8s} {'/ GEMM':>7s} {'/ GEMM out=':>12s}")
    for name, samples in times.items():
        best = min(samples)
        print(f"{name:36s} {best:8.3f} {statistics.median(samples):9.3f} {flops / best / 1e9:8.1f} "
              f"{best / gemm_best:7.2f} {best / gemm_out_best:12.2f}")
    shard_best = min(times[f"{SHARD_SIZE} x {SHARD_SIZE} shards"])
    print(f"meta_similarity is {shard_best / min(times['meta_similarity']):.2f}x faster than {SHARD_SIZE} x {SHARD_SIZE} shards")


if __name__ == "__main__":
    main()
