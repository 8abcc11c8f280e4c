"""How long a dev evaluation during training takes at a paper row's full size, on this machine.

Times the train stage's own `evaluate_split` (every dev image and caption encoded, exact
scoring, recall) with the row's model (random weights of its architecture, as
`benchmarks/memory.py`) on `--images` images and 5 captions each of Flickr30K's typical
length, and scales the encoding linearly to Flickr30K's dev split (1000 images, 5000 captions);
the scoring is timed at that full size. JPEG decoding, which `data.cache_res: 0` adds in the
main process, is timed apart on photo-sized JPEGs. The other processes of a multi-process run
wait this long at the barrier after each epoch (`train.dist_timeout_minutes` bounds the wait).

    python benchmarks/dev_evaluation.py                       # f30k-vit-224, 100 images
    python benchmarks/dev_evaluation.py --row f30k-swin-384 --images 50
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from avse.compute import resolve_precision  # noqa: E402
from avse.data.dataset import PreparedSplit  # noqa: E402
from avse.data.images import load_rgb, resize_square  # noqa: E402
from avse.data.tokenizer import CaptionTokenizer, load_tokenizer  # noqa: E402
from avse.experiments import FULL_SIZE_RANDOM, load_experiments  # noqa: E402
from avse.model import backbones  # noqa: E402
from avse.model.avse import build_model  # noqa: E402
from avse.training.step import evaluate_split  # noqa: E402
from gpu import synchronize  # noqa: E402 (beside this script, on the path as its folder)

DEV_IMAGES = 1000
CAPTION = "a young man in a blue shirt and black shorts is riding a bicycle down a busy street next to a woman"  # 21 words


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--row", default="f30k-vit-224", help="a row of experiments.yaml")
    parser.add_argument("--images", type=int, default=100)
    args = parser.parse_args()
    experiment = load_experiments(REPO / "experiments.yaml")[args.row]
    config = experiment.config(REPO / "params.yaml", [*FULL_SIZE_RANDOM, "train.precision=auto", "embed.batch_size=64"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_precision(config.train.precision, device)
    model = build_model(config, vocab_size=30522).to(device).eval()
    tokenize = CaptionTokenizer(load_tokenizer(backbones.source("minilm")), config.model.text.max_len)  # BERT's uncased vocabulary
    res, n = config.data.img_res, args.images

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        np.save(folder / "images.npy", np.random.default_rng(0).integers(0, 256, (n, res, res, 3), dtype=np.uint8))
        split = PreparedSplit("dev", [CAPTION] * 5 * n, np.repeat(np.arange(n), 5), np.arange(n), [""] * n, folder / "images.npy")
        synchronize(device)  # kernels are queued asynchronously on a GPU: the clock is read once they are done
        start = time.perf_counter()
        evaluate_split(model, split, tokenize, config, device, dtype)
        synchronize(device)
        encoded = time.perf_counter() - start
        photo = folder / "photo.jpg"  # Flickr30K's photos are about 500 x 375
        cv2.imwrite(str(photo), np.random.default_rng(1).integers(0, 256, (375, 500, 3), dtype=np.uint8))
        start = time.perf_counter()
        for _ in range(50):
            resize_square(load_rgb(photo), res, config.data.resize)
        decode = (time.perf_counter() - start) / 50

    img = torch.randn(DEV_IMAGES, config.model.views * config.model.embed_size, device=device)
    cap = torch.randn(5 * DEV_IMAGES, config.model.embed_size, device=device)
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        model.similarity(img, cap, chunk_size=config.eval.chunk_size)
    synchronize(device)
    scoring = time.perf_counter() - start
    scale = DEV_IMAGES / n
    total = encoded * scale + scoring + decode * DEV_IMAGES
    print(f"{args.row} on {device} ({str(dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads), "
          f"{n} images and {5 * n} captions measured:")
    print(f"  encoding (images and captions)   {encoded:8.1f} s   -> {encoded * scale:8.1f} s for {DEV_IMAGES} and {5 * DEV_IMAGES}")
    print(f"  exact scoring {DEV_IMAGES} x {5 * DEV_IMAGES}        {scoring:8.1f} s")
    print(f"  JPEG decoding (data.cache_res 0) {decode * 1000:8.1f} ms an image -> {decode * DEV_IMAGES:8.1f} s")
    print(f"  dev evaluation                                 {total:8.1f} s")


if __name__ == "__main__":
    main()
