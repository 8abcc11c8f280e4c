"""Training memory of the paper's rows at full size, with and without `train.grad_checkpointing`.

Each measurement is one `avse train --dry-run` in a fresh process: the row's settings from
`experiments.yaml` with randomly initialised backbones of the same architecture (BERT-base keeps
its 30522-token vocabulary), in bf16 autocast as a GPU trains, captions of 96 word pieces (every
Flickr30K caption fits; the paper rows do not truncate). On a CPU the peak is the process's peak
resident memory, an honest proxy for what a GPU holds: the same weights, gradients and
activations, plus the interpreter and its libraries where a GPU has its CUDA context (on a GPU
the dry run reports `torch.cuda.max_memory_allocated`).

The dry run reports the peak by its first backward pass, before the optimiser allocates its
state. Two batch sizes give a line: the slope is the memory per sample (activations, which
checkpointing cuts), the intercept the weights, gradients and process. A training step holds
AdamW's two moments as well (8 bytes per parameter), so the fixed part is the intercept plus
those. The largest batch per GPU is `(0.9 x GPU memory - fixed) / per sample`, rounded down,
the 10 % kept for the allocator's fragmentation and cuBLAS workspaces.

    python benchmarks/memory.py                       # every backbone and resolution of the rows
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
ADAM_BYTES = 8  # AdamW's two fp32 moments per parameter
MEASURED = [*FULL_SIZE_RANDOM, "train.precision=bf16", "data.num_workers=0", "tracking.enabled=false"]


def dry_run(overrides: list[str]) -> dict[str, float]:
    """Parameters (millions), the whole step's peak and the first backward pass's peak (MB)."""
    command = [sys.executable, "-m", "avse.cli", "train", "--dry-run", "--steps", "1", "--params", str(REPO / "params.yaml")]
    out = subprocess.run([*command, *(f"-S{o}" for o in overrides)], capture_output=True, text=True, check=True, cwd=REPO).stdout
    peak = re.search(r"peak memory\s+(\d+) MB \((\d+) MB by the first backward pass", out)
    return {"params_m": float(re.search(r"parameters\s+([\d.]+)M", out).group(1)), "peak_mb": float(peak.group(1)),
            "backward_mb": float(peak.group(2))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=["f30k-*"], help="experiments (names or patterns); one per backbone and resolution")
    parser.add_argument("--batches", type=int, nargs=2, default=[2, 8], help="the two batch sizes of the line")
    args = parser.parse_args()
    small, large = args.batches
    print(f"| row | grad_checkpointing | fixed GB | MB per sample | whole step's peak at batch {small}, GB | "
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
            low, high = (dry_run([*base, f"train.batch_size={b}"]) for b in (small, large))
            per_sample = (high["backward_mb"] - low["backward_mb"]) / (large - small)
            fixed = low["backward_mb"] - small * per_sample + ADAM_BYTES * low["params_m"] * 1e6 / 2**20
            fits = [max(0, int((0.9 * gb * 1024 - fixed) // per_sample)) for gb in GPUS_GB]  # MB throughout
            print(f"| {experiment.name} | {checkpointing} | {fixed / 1024:.1f} | {per_sample:.0f} | {low['peak_mb'] / 1024:.1f} | "
                  + " | ".join(map(str, fits)) + " |", flush=True)
            print(f"  ({time.perf_counter() - start:.0f} s of dry runs)", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
