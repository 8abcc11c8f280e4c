"""Time ``recall_metrics`` against the per-row argsort loops of the VSE++ evaluation.

Run with the package installed (``make install``)::

    python benchmarks/recall.py                       # COCO 5K: 5000 images x 25000 captions
    python benchmarks/recall.py --images 1000         # COCO 1K fold / Flickr30K size

Scores are random fp32 (no ties at the positions that matter, for this seed), so both
ways must give identical metrics; the script checks that before printing the table.
The argsort loops run once (they take many seconds); ``recall_metrics`` runs
``--rounds`` times after a warm-up, and its best time is used for the ratio.
"""

import argparse
import statistics
import time

import numpy as np
import torch

from avse.evaluation.recall import recall_metrics


def argsort_loop_metrics(sims: np.ndarray, captions_per_image: int) -> dict[str, float]:
    """Ranks by sorting every row (i2t) and every column (t2i), one at a time."""
    n_images, n_captions = sims.shape
    i2t_ranks = np.zeros(n_images)
    for image in range(n_images):
        order = np.argsort(sims[image])[::-1]
        i2t_ranks[image] = min(
            np.where(order == caption)[0][0]
            for caption in range(captions_per_image * image, captions_per_image * (image + 1))
        )
    t2i_ranks = np.zeros(n_captions)
    by_caption = sims.T
    for caption in range(n_captions):
        order = np.argsort(by_caption[caption])[::-1]
        t2i_ranks[caption] = np.where(order == caption // captions_per_image)[0][0]

    metrics = {}
    for direction, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        for k in (1, 5, 10):
            metrics[f"{direction}_r{k}"] = 100.0 * len(np.where(ranks < k)[0]) / len(ranks)
    metrics["rsum"] = sum(metrics[f"{direction}_r{k}"] for direction in ("i2t", "t2i") for k in (1, 5, 10))
    for direction, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        metrics[f"{direction}_medr"] = float(np.floor(np.median(ranks)) + 1)
        metrics[f"{direction}_meanr"] = float(ranks.mean() + 1)
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    n_captions = args.images * args.captions_per_image
    generator = torch.Generator().manual_seed(0)
    sims = torch.randn(args.images, n_captions, generator=generator)
    # A diagonal bonus spreads the ranks over small and large values, like a trained model's.
    own_bonus = torch.eye(args.images).repeat_interleave(args.captions_per_image, dim=1)
    sims += 3.0 * own_bonus
    del own_bonus

    start = time.perf_counter()
    expected = argsort_loop_metrics(sims.numpy(), args.captions_per_image)
    loop_seconds = time.perf_counter() - start

    recall_metrics(sims, args.captions_per_image)  # warm-up
    samples = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        metrics = recall_metrics(sims, args.captions_per_image)
        samples.append(time.perf_counter() - start)
    # Same ranks; the float formulas may round differently in the last bit.
    if metrics.keys() != expected.keys() or any(abs(metrics[key] - expected[key]) > 1e-9 for key in expected):
        raise AssertionError(f"metrics differ:\n{metrics}\n{expected}")

    print(f"{args.images} x {n_captions} scores, fp32, {torch.get_num_threads()} CPU threads; identical metrics: "
          f"rsum {metrics['rsum']:.2f}, i2t_r1 {metrics['i2t_r1']:.2f}, t2i_r1 {metrics['t2i_r1']:.2f}")
    print(f"{'method':24s} {'best s':>8s} {'median s':>9s}")
    print(f"{'argsort loops':24s} {loop_seconds:8.3f} {loop_seconds:9.3f}")
    best = min(samples)
    print(f"{'recall_metrics':24s} {best:8.3f} {statistics.median(samples):9.3f}")
    print(f"recall_metrics is {loop_seconds / best:.1f}x faster")


if __name__ == "__main__":
    main()
