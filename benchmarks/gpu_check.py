"""The GPU check: the CUDA path of this project in one command, a few minutes on one GPU, no network.

    make gpu-check                     # or: PYTHONPATH=. python3 benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --tiny    # the same sections, small, on whatever device there is

It runs on the packages already installed (a GPU machine often has its own torch, newer or
older than `requirements.txt` pins, and no package index), and first names any that are missing;
without a CUDA device it stops at once (exit status 2) unless `--tiny` is given.
Sections, each recorded in the summary file (`gpu_check.json`, `--out`):

1. environment: the device, its bf16 support, the versions of torch and transformers;
2. pipeline: the embedded data, small, through synthesize, prepare, train, embed and evaluate
   on the device, as `avse` runs them (tracking off);
3. repeatability: the same training again gives the same bits (`train.deterministic: true`);
4. processes: one process against two on the same global batch give the same objective and
   gradients, TF32 off (needs two GPUs; on one GPU it is skipped, and the CPU test suite covers it with gloo);
5. rows: each architecture of the paper's rows (`experiments.yaml`) at full size on one
   process, at its per-process batch: step time, pairs/s, MFU (against the device's dense bf16
   peak, `--peak-tflops` for a device `gpu.peak_tflops` does not know) and the row's own peak
   memory, in the default kernels and in the fast ones (`train.deterministic: false`,
   `train.compile: true`), with what torch.compile did in the fast ones (frames compiled,
   recompilations, a fallback to eager) and, on a GPU, the host synchronisations left in the
   timed steps (torch's sync debug mode).

A section that would start after `--budget-minutes` is skipped and says so.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

# Import name -> package name: what the train, embed and evaluate stages import (MLflow and DVC are not needed here).
NEEDED = {"torch": "torch", "transformers": "transformers", "tokenizers": "tokenizers", "numpy": "numpy", "cv2": "opencv-python-headless",
          "pandas": "pandas", "yaml": "PyYAML", "tqdm": "tqdm", "matplotlib": "matplotlib"}
PIPELINE = ["data.synthetic.train_images=600", "data.synthetic.dev_images=100", "data.synthetic.test_images=100", "data.num_workers=2",
            "train.max_steps=60", "train.batch_size=64", "tracking.enabled=false"]
TINY_PIPELINE = ["data.synthetic.train_images=40", "data.synthetic.dev_images=10", "data.synthetic.test_images=10", "data.num_workers=0",
                 "train.max_steps=3", "train.batch_size=8", "tracking.enabled=false", "model.embed_size=32", "model.block_dim=16",
                 "data.vocab_size=100"]
FAST = ["train.deterministic=false", "train.compile=true"]
# On two CPU cores inductor takes about a minute to build the fast row's bf16 kernels, under half that for fp32 ones.
TINY_CPU_ROWS = ["train.precision=fp32"]


def missing_packages() -> list[str]:
    return [package for module, package in NEEDED.items() if importlib.util.find_spec(module) is None]


def avse(stage: str, overrides: list[str], cwd: Path) -> float:
    """Run `avse <stage>` in `cwd`; returns its seconds."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "avse.cli", stage, "--params", str(REPO / "params.yaml"), *(f"-S{o}" for o in overrides)],
                            cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"avse {stage} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def environment() -> dict:
    import torch
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": torch.version.cuda, "device": "cpu"}
    if torch.cuda.is_available():
        info |= {"device": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
                 "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
                 "bf16_native": torch.cuda.is_bf16_supported(including_emulation=False)}
    return info


def pipeline_and_repeatability(overrides: list[str], work: Path) -> tuple[dict, dict]:
    """The embedded pipeline once, then its training again from scratch: the two trained models must be the same bits."""
    import torch

    seconds = {stage: avse(stage, overrides, work) for stage in ("synthesize", "prepare", "train")}
    first = torch.load(work / "models" / "best.pt", weights_only=True)["model"]
    seconds |= {stage: avse(stage, overrides, work) for stage in ("embed", "evaluate")}
    pipeline = {"seconds": seconds, "train": json.loads((work / "metrics" / "train.json").read_text()),
                "speed": json.loads((work / "metrics" / "train_speed.json").read_text()),
                "eval": json.loads((work / "metrics" / "eval.json").read_text())}
    shutil.rmtree(work / "models")
    avse("train", overrides, work)
    second = torch.load(work / "models" / "best.pt", weights_only=True)["model"]
    differing = [name for name, value in first.items() if not torch.equal(value, second[name])]
    return pipeline, {"same_bits": not differing, "differing_tensors": differing[:10]}


def processes(work: Path) -> dict:
    """tests/ddp_worker.py on one process and on two: the same objective and gradients on the same global batch.

    TF32 is off in both (`NVIDIA_TF32_OVERRIDE=0` switches it off in cuBLAS and cuDNN whatever torch's flags say):
    a last-bit difference between the runs can round a matmul input to another TF32 value, 10 bits of mantissa, about
    1e-3 apart, ten times the test suite's tolerance."""
    import torch

    worker = str(REPO / "tests" / "ddp_worker.py")
    env = {**os.environ, "PYTHONPATH": str(REPO), "NVIDIA_TF32_OVERRIDE": "0"}
    for command in ([worker, str(work / "one.pt"), "hinge"],
                    ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", worker, str(work / "two.pt"), "hinge"]):
        result = subprocess.run([sys.executable, *command], env=env, capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    one, two = torch.load(work / "one.pt"), torch.load(work / "two.pt")
    # The test suite's tolerance (tests/test_training.py): float sums in another order, nothing more.
    differing = [name for name, grad in one["grads"].items() if not torch.allclose(two["grads"][name], grad, rtol=1e-4, atol=1e-6)]
    worst = max(float((two["grads"][name] - grad).abs().max()) for name, grad in one["grads"].items())
    return {"objective_one": one["objective"], "objective_two": two["objective"], "largest_gradient_difference": worst,
            "differing_gradients": differing[:10],
            "same": abs(one["objective"] - two["objective"]) <= 1e-5 * abs(one["objective"]) and not differing}


def rows(tiny: bool, steps: int, peak: float | None) -> dict:
    """Step time, pairs/s, MFU and peak memory of each architecture of the paper's rows, default and fast kernels;
    in the fast ones, what torch.compile did."""
    import torch

    from avse.experiments import FULL_SIZE_RANDOM, load_experiments
    from gpu import TINY_RUNS, compilations, training

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if tiny:
        runs = {label: [*overrides, *(TINY_CPU_ROWS if device.type == "cpu" else [])] for label, overrides in TINY_RUNS.items()}
    else:
        runs, seen = {}, set()
        for experiment in load_experiments(REPO / "experiments.yaml").values():
            key = (experiment.settings["model.vision.name"], experiment.settings["data.img_res"])
            if key not in seen:
                seen.add(key)
                runs[experiment.name] = [*experiment.overrides(), *FULL_SIZE_RANDOM, "train.precision=auto", "train.nproc_per_node=1"]
    results = {}
    for label, overrides in runs.items():
        for setting, extra in (("default", []), ("fast", FAST)):
            with compilations() as compiled:
                result = training([*overrides, *extra], steps, device)
            result["mfu"] = result["flops"] / result["seconds"] / 1e12 / peak if peak else None
            results[f"{label}, {setting}"] = result | ({"compilation": compiled} if setting == "fast" else {})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="every section small: seconds, on a CPU too")
    parser.add_argument("--out", default="gpu_check.json", help="summary file (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row and setting")
    parser.add_argument("--budget-minutes", type=float, default=7.0, help="no section starts after this")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, for MFU (default: by device name)")
    args = parser.parse_args()
    no_cuda = ("error: no CUDA device; python benchmarks/gpu_check.py --tiny runs the same sections small on this machine\n")
    if not args.tiny and shutil.which("nvidia-smi") is None:  # before importing anything: a CPU machine is told at once
        parser.exit(2, no_cuda)
    if missing := missing_packages():
        sys.exit(f"missing packages: {' '.join(missing)}. Without a package index, on a machine with one and the same Python "
                 f"version: `pip download -d wheels {' '.join(missing)}`; copy wheels/ here, then "
                 f"`pip install --no-index --find-links wheels {' '.join(missing)}`.")
    import torch

    if not args.tiny and not torch.cuda.is_available():
        parser.exit(2, no_cuda)
    from gpu import mfu_text, peak_tflops

    started = time.perf_counter()
    summary: dict = {"environment": environment()}
    device_name = summary["environment"]["device"]
    peak = summary["environment"]["peak_tflops"] = args.peak_tflops or peak_tflops(device_name)
    print(json.dumps(summary["environment"]), flush=True)
    if not peak:
        print(f"MFU: {mfu_text(None, device_name)}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sections = {
            "pipeline": lambda: pipeline_and_repeatability(TINY_PIPELINE if args.tiny else PIPELINE, work),
            "processes": lambda: processes(work) if (torch.cuda.device_count() >= 2 or not torch.cuda.is_available())
            else {"skipped": "one process against two needs two GPUs (NCCL takes one GPU per process)"},
            "rows": lambda: rows(args.tiny, args.steps, peak),
        }
        for name, section in sections.items():
            if time.perf_counter() - started > args.budget_minutes * 60:
                summary[name] = {"skipped": f"past the budget of {args.budget_minutes} minutes"}
            elif name == "pipeline":
                summary["pipeline"], summary["repeatability"] = section()
            else:
                summary[name] = section()
            for key in (name, "repeatability") if name == "pipeline" else (name,):
                print(f"{key}: {json.dumps(summary[key], default=str)[:2000]}", flush=True)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    Path(args.out).write_text(json.dumps(summary, indent=2, default=str))
    print(f"wrote {args.out} ({summary['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
