"""Peak memory of the evaluate stage at COCO 5K sizes, for several `eval.chunk_size` values.

Each measurement runs in a fresh process: exact scoring of 5000 images (2 views of 1024)
against 25000 captions with 256-d blocks, then the 5-fold 1K and 5K recall metrics, as
the evaluate stage does. The floor is what any exact evaluation holds: both embedding
matrices and the `[5000, 25000]` score matrix. Scoring the whole matrix at once would
need `5000 x 25000 x 8 x 4` block scores (16 GB) on top.

    python benchmarks/evaluation_memory.py
    python benchmarks/evaluation_memory.py --images 1000    # Flickr30K 1K sizes
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def child(images: int, chunk_size: int) -> None:
    from avse.evaluation.evaluate import Embeddings, protocol_metrics, score

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    embeddings = Embeddings(torch.randn(images, 2048), torch.arange(images), torch.randn(5 * images, 1024),
                            torch.arange(5 * images) // 5, {"block_dim": 256, "matching": "max", "dustbin": 1.0, "sinkhorn_iters": 20})
    start = time.perf_counter()
    sims = score(embeddings, chunk_size)
    for protocol in ("5fold1k", "5k") if images % 1000 == 0 and images > 1000 else ("1k",):
        protocol_metrics(sims, protocol)
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "start_mb": before}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.images, args.child)
        return

    floor_mb = (args.images * 2048 + 5 * args.images * 1024 + 5 * args.images * args.images) * 4 / 2**20
    print(f"{args.images} images x {5 * args.images} captions; embeddings + score matrix: {floor_mb:.0f} MB")
    print(f"{'chunk':>6} {'seconds':>8} {'peak RSS MB':>12} {'above start':>12} {'/ floor':>8}")
    for chunk in args.chunk_sizes:
        out = subprocess.run([sys.executable, __file__, "--images", str(args.images), "--child", str(chunk)],
                             capture_output=True, text=True, check=True).stdout
        result = json.loads(out.splitlines()[-1])
        above = result["peak_mb"] - result["start_mb"]
        print(f"{chunk:6d} {result['seconds']:8.1f} {result['peak_mb']:12.0f} {above:12.0f} {above / floor_mb:7.2f}x")


if __name__ == "__main__":
    main()
