"""How far test recall spreads over seeds for one setting, and what a run costs.

Each seed trains, embeds and evaluates in a folder of its own under the project's
`outputs/seed-spread/` (its params.yaml copied, its prepared data linked in, MLflow off), so
several seeds can run side by side:
`--jobs 2` runs two at a time with one thread each. Prints one line per seed as it ends and
a summary (test rsum mean ± sd, range, minutes per run), and appends one JSON line per
seed to `--record` for tables made later.

    python benchmarks/seed_spread.py --label default --seeds 0-4 --jobs 2
    python benchmarks/seed_spread.py --label epochs4 --seeds 0-4 -S train.epochs=4
    python benchmarks/seed_spread.py --table default epochs4     # the records as a markdown table

Needs `dvc repro prepare` (the prepared data) first.
"""

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from avse.training.curve import CURVE_CSV, TrainingCurve

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("train", "embed", "evaluate")
# Every run first falls to a training loss of about 2.9 (colours known, shapes not) and stays there until its
# encoders start to tell shapes apart; the first logged loss under this marks where it left (docs/embedded-benchmark.md).
PLATEAU_LOSS = 2.5


def parse_seeds(text: str) -> list[int]:
    """'0-4' or '0,3,7' -> seeds."""
    if "-" in text:
        first, last = (int(part) for part in text.split("-"))
        return list(range(first, last + 1))
    return [int(part) for part in text.split(",")]


def run_seed(project: Path, label: str, seed: int, overrides: list[str], threads: int) -> dict:
    """Train, embed and evaluate one seed in its own folder; returns what it measured."""
    folder = project / "outputs" / "seed-spread" / label / f"seed{seed}"
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "metrics").mkdir(parents=True)
    (folder / "data").symlink_to((project / "data").resolve(), target_is_directory=True)
    shutil.copy(project / "params.yaml", folder / "params.yaml")
    settings = [*overrides, f"train.seed={seed}", "tracking.enabled=false"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    with open(folder / "log.txt", "w") as log:
        for stage in STAGES:
            command = [sys.executable, "-m", "avse.cli", stage]
            for setting in settings:
                command += ["-S", setting]
            done = subprocess.run(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
            if done.returncode != 0:
                raise RuntimeError(f"seed {seed}: `avse {stage}` failed, see {folder / 'log.txt'}")
    minutes = (time.perf_counter() - start) / 60
    test = json.loads((folder / "metrics" / "eval.json").read_text())["1k"]
    rows = TrainingCurve.load(folder / CURVE_CSV).rows
    evaluations = [row for row in rows if "dev_rsum" in row]
    plateau_exit = next((int(row["step"]) for row in rows if row.get("loss", math.inf) < PLATEAU_LOSS), None)
    return {
        "label": label,
        "seed": seed,
        "overrides": overrides,
        "test_rsum": test["rsum"],
        "i2t_r1": test["i2t_r1"],
        "t2i_r1": test["t2i_r1"],
        "dev_rsum": [row["dev_rsum"] for row in evaluations],
        "view_cosine": [row["dev_view_cosine"] for row in evaluations if "dev_view_cosine" in row],
        "plateau_exit_step": plateau_exit,
        "minutes": round(minutes, 2),
        "threads": threads,
        "machine": cpu_name(),
    }


def cpu_name() -> str:
    """The CPU's model name as the kernel reports it (`platform.processor()` is empty on most Linux systems)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def mean_sd(values: list[float], digits: int = 1) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def markdown_table(records: list[dict], labels: list[str]) -> str:
    """One row per label, in the order given: its overrides, seeds, test recall mean ± sd over the seeds, the
    view cosine at the last dev evaluation, the step each seed left the plateau ("never": it stayed), and the
    median minutes per run."""
    lines = ["| setting | overrides | seeds | test rsum | range | i2t R@1 | t2i R@1 | view cosine | left the plateau at step | min per run |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for label in labels:
        runs = [record for record in records if record["label"] == label]
        if not runs:
            raise SystemExit(f"error: no runs labelled {label!r} in the record")
        rsums = [run["test_rsum"] for run in runs]
        overrides = " ".join(f"`{override}`" for override in runs[0]["overrides"]) or "(params.yaml)"
        cosine = mean_sd([run["view_cosine"][-1] for run in runs], digits=3) if runs[0]["view_cosine"] else ""
        exits = ", ".join("never" if run["plateau_exit_step"] is None else str(run["plateau_exit_step"]) for run in runs)
        lines.append(f"| {label} | {overrides} | {len(runs)} | {mean_sd(rsums)} | {min(rsums):.1f}-{max(rsums):.1f} | "
                     f"{mean_sd([run['i2t_r1'] for run in runs])} | {mean_sd([run['t2i_r1'] for run in runs])} | {cosine} | "
                     f"{exits} | {statistics.median(run['minutes'] for run in runs):.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", help="name of the setting to run (folder and record label)")
    parser.add_argument("--table", nargs="+", metavar="LABEL", help="print the record's runs of these labels as a markdown table")
    parser.add_argument("--seeds", default="0-4", help="'0-4' or '0,1,2' (default 0-4)")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run side by side (threads split between them)")
    parser.add_argument("--threads", type=int, help="threads per run (default: the cores shared among --jobs)")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--project", type=Path, default=ROOT, help="project with params.yaml and prepared data (default: this one)")
    parser.add_argument("--record", type=Path, help="JSON lines file of the runs (default: <project>/outputs/seed-spread/runs.jsonl)")
    args = parser.parse_args()
    record_file = args.record or args.project / "outputs" / "seed-spread" / "runs.jsonl"
    if args.table:
        print(markdown_table([json.loads(line) for line in record_file.read_text().splitlines()], args.table))
        return
    if not args.label:
        parser.error("--label (a setting to run) or --table (labels to tabulate) is required")

    seeds = parse_seeds(args.seeds)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    results = []
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_seed, args.project, args.label, seed, args.overrides, threads) for seed in seeds]
        for future in futures:
            try:
                result = future.result()
            except RuntimeError as error:
                raise SystemExit(f"error: {error}") from None
            results.append(result)
            with open(record_file, "a") as record:
                record.write(json.dumps(result) + "\n")
            dev = " ".join(f"{value:.1f}" for value in result["dev_rsum"])
            print(f"{args.label} seed {result['seed']}: test rsum {result['test_rsum']:.1f} "
                  f"(dev by evaluation: {dev}), {result['minutes']:.1f} min", flush=True)
    rsums = [result["test_rsum"] for result in results]
    print(f"{args.label}: test rsum {mean_sd(rsums)} over {len(rsums)} seeds (range {min(rsums):.1f}-{max(rsums):.1f}), "
          f"{statistics.median(r['minutes'] for r in results):.1f} min per run at {threads} thread(s)")


if __name__ == "__main__":
    main()
