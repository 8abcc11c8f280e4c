"""Training memory of the paper's rows at full size, with and without `train.grad_checkpointing`.

Each measurement is one `avse train --dry-run` in a fresh process: the row's settings from
`experiments.yaml` with randomly initialised backbones of the same architecture (BERT-base keeps
its 30522-token vocabulary), in bf16 autocast as a GPU trains, captions of 96 word pieces (every
Flickr30K caption fits; the paper rows do not truncate). The peak is the process's peak resident
memory, an honest proxy on a CPU for what a GPU holds: the same weights, gradients, optimiser
state and activations, plus the interpreter and its libraries where a GPU has its CUDA context.

Two batch sizes give a line: the slope is the memory per sample (activations, which checkpointing
cuts), the intercept the fixed part (weights, gradients, AdamW state, the process). The largest
batch per GPU is `(0.9 x GPU memory - fixed) / per sample`, the 10 % kept for the allocator's
fragmentation, rounded down.

    python benchmarks/memory.py                       # every resolution and backbone of the rows
    python benchmarks/memory.py --rows 'f30k-vit-*' --batches 2 4
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from avse.experiments import FULL_SIZE_RANDOM, load_experiments, select  # noqa: E402

GPUS_GB = (24, 40, 80)
MEASURED = [*FULL_SIZE_RANDOM, "train.precision=bf16", "data.num_workers=0", "tracking.enabled=false"]


def peak_mb(overrides: list[str], steps: int) -> tuple[float, float]:
    """(peak memory in MB, seconds per step) of one dry run."""
    command = [sys.executable, "-m", "avse.cli", "train", "--dry-run", "--steps", str(steps), "--params", str(REPO / "params.yaml")]
    out = subprocess.run([*command, *(f"-S{o}" for o in overrides)], capture_output=True, text=True, check=True, cwd=REPO).stdout
    memory = float(re.search(r"peak memory\s+(\d+) MB", out).group(1))
    seconds = float(re.search(r"step\s+([\d.]+) s", out).group(1))
    return memory, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=["f30k-*"], help="experiments (names or patterns); one per backbone and resolution")
    parser.add_argument("--batches", type=int, nargs=2, default=[2, 6], help="the two batch sizes of the line")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per dry run, after one warm-up step")
    args = parser.parse_args()
    small, large = args.batches
    print(f"| row | grad_checkpointing | fixed GB | MB per sample | s per step at batch {large} | "
          + " | ".join(f"batch per {gb} GB GPU" for gb in GPUS_GB) + " |")
    print("| --- | --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in GPUS_GB) + " |", flush=True)
    seen = set()
    for experiment in select(load_experiments(REPO / "experiments.yaml"), args.rows):
        key = (experiment.settings["model.vision.name"], experiment.settings["data.img_res"])
        if key in seen:
            continue
        seen.add(key)
        for checkpointing in ("false", "true"):
            base = [*experiment.overrides(), *MEASURED, f"train.grad_checkpointing={checkpointing}", "train.nproc_per_node=1"]
            start = time.perf_counter()
            (low, _), (high, seconds) = (peak_mb([*base, f"train.batch_size={b}"], args.steps) for b in (small, large))
            per_sample = (high - low) / (large - small)
            fixed = low - small * per_sample
            fits = [max(0, int((0.9 * gb * 1024 - fixed) // per_sample)) for gb in GPUS_GB]  # MB throughout
            print(f"| {experiment.name} | {checkpointing} | {fixed / 1024:.1f} | {per_sample:.0f} | {seconds:.1f} | "
                  + " | ".join(map(str, fits)) + " |", flush=True)
            print(f"  ({time.perf_counter() - start:.0f} s of dry runs)", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
