"""Training speed of the fast-kernel options against the default, on this machine.

`train.compile: true` compiles every transformer block of both backbones with torch.compile;
`train.deterministic: false` lets attention take SDPA's fused kernels on CUDA (on a CPU,
bf16 training keeps the math path either way, see `avse/compute.py`) and drops the
deterministic-algorithm guard. Each configuration is one `avse train --dry-run` in a fresh
process (compilation happens in its warm-up step, untimed); rounds are interleaved and the
best pairs/s of each configuration is kept.

    python benchmarks/fast_kernels.py                                   # the embedded default
    python benchmarks/fast_kernels.py -S model.vision.name=vit-tiny     # any overrides
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {
    "default": [],
    "compile": ["train.compile=true"],
    "deterministic false": ["train.deterministic=false"],
    "compile, deterministic false": ["train.compile=true", "train.deterministic=false"],
}


def pairs_per_s(overrides: list[str], steps: int) -> float:
    command = [sys.executable, "-m", "avse.cli", "train", "--dry-run", "--steps", str(steps), "--params", str(REPO / "params.yaml")]
    out = subprocess.run([*command, *(f"-S{o}" for o in overrides)], capture_output=True, text=True, check=True, cwd=REPO).stdout
    return float(re.search(r"throughput\s+([\d.]+) pairs/s", out).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-S", dest="overrides", action="append", default=[], help="parameter overrides for every configuration")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per dry run")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best of each is kept")
    args = parser.parse_args()
    best = dict.fromkeys(SETTINGS, 0.0)
    for _ in range(args.rounds):
        for name, overrides in SETTINGS.items():
            best[name] = max(best[name], pairs_per_s([*args.overrides, *overrides], args.steps))
    print("| setting | pairs/s | / default |\n| --- | ---: | ---: |")
    for name, value in best.items():
        print(f"| {name} | {value:.1f} | {value / best['default']:.2f}x |")


if __name__ == "__main__":
    main()
