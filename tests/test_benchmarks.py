"""The benchmark scripts keep running as the code they measure changes (their --tiny modes, on the CPU)."""

import csv
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

from conftest import copy_finished

REPO = Path(__file__).resolve().parents[1]


def run_benchmark(*args: str) -> str:
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_gpu_benchmark_reports_training_throughput_flops_and_scoring_time():
    out = run_benchmark("benchmarks/gpu.py", "--tiny", "--steps", "1")
    train = re.search(r"train vit-tiny 64, batch 16: ([\d.]+) pairs/s in b?float(?:16|32), \d+ ms/step, ([\d.]+) TFLOP/step", out)
    assert train and float(train.group(1)) > 0 and float(train.group(2)) > 0, out
    assert "MFU n/a (unknown device cpu: --peak-tflops)" in out, out
    assert re.search(r"score 200 x 1000 .*: [\d.]+ s", out), out


def test_training_step_benchmark_reports_a_ratio_against_the_official_style_step():
    out = run_benchmark("benchmarks/training_step.py", "--tiny", "--steps", "1")
    assert re.search(r"official-style step \(fp32, eager\) +[\d.]+ s +[\d.]+ pairs/s", out), out
    assert re.search(r"ratio +[\d.]+x", out), out


def test_determinism_benchmark_reports_the_cost_of_deterministic_kernels():
    out = run_benchmark("benchmarks/determinism.py", "--rounds", "1", "--steps", "1", "-S", "train.batch_size=8")
    assert re.search(r"PyTorch defaults +[\d.]+ s/step +[\d.]+ pairs/s", out), out
    assert re.search(r"train.deterministic: true +[\d.]+ s/step", out) and re.search(r"cost \(deterministic / default\) +[\d.]+x", out), out


def test_gpu_check_runs_each_section_and_writes_its_summary(tmp_path):
    """`make gpu-check` on any device, small: the pipeline, the retrained model's bits, one process against two, the rows,
    the fast one compiled."""
    run_benchmark("benchmarks/gpu_check.py", "--tiny", "--steps", "1", "--out", str(tmp_path / "gpu_check.json"))
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["pipeline"]["train"]["steps"] == 3 and summary["pipeline"]["eval"]["1k"]["rsum"] > 0
    assert summary["repeatability"] == {"same_bits": True, "differing_tensors": []}
    assert summary["processes"].get("same", True) is True  # skipped on a machine with one GPU
    assert set(summary["rows"]) == {"vit-tiny 64, batch 16, default", "vit-tiny 64, batch 16, fast"}
    fast = summary["rows"]["vit-tiny 64, batch 16, fast"]
    assert fast["compilation"]["frames_compiled"] > 0 and fast["compilation"]["fell_back_to_eager"] is False, fast
    assert all("peak_memory_gib" in row and "mfu" in row for row in summary["rows"].values())


def test_seed_spread_trains_each_seed_apart_and_summarises_their_test_recall(tiny_pipeline, tmp_path):
    project = copy_finished(tiny_pipeline, tmp_path / "project")
    record = tmp_path / "runs.jsonl"
    out = run_benchmark("benchmarks/seed_spread.py", "--project", str(project), "--label", "short", "--seeds", "0-1", "--jobs", "2",
                        "--record", str(record), "-S", "train.max_steps=2")
    runs = [json.loads(line) for line in record.read_text().splitlines()]
    assert [run["seed"] for run in runs] == [0, 1]
    for run in runs:  # each seed's own evaluation, in its own folder
        evaluated = json.loads((project / "outputs/seed-spread/short" / f"seed{run['seed']}" / "metrics/eval.json").read_text())
        assert run["test_rsum"] == evaluated["1k"]["rsum"] and run["overrides"] == ["train.max_steps=2"] and len(run["dev_rsum"]) == 1
        with open(project / "outputs/seed-spread/short" / f"seed{run['seed']}" / "metrics/train_curve.csv") as curve:
            losses = [(int(row["step"]), float(row["loss"])) for row in csv.DictReader(curve) if row["loss"]]
        assert losses and run["plateau_exit_step"] == next((step for step, loss in losses if loss < 2.5), None)
    rsums = [run["test_rsum"] for run in runs]
    spread = f"{statistics.mean(rsums):.1f} ± {statistics.stdev(rsums):.1f}"
    assert f"short: test rsum {spread} over 2 seeds" in out
    table = run_benchmark("benchmarks/seed_spread.py", "--record", str(record), "--table", "short").splitlines()
    assert table[2].startswith(f"| short | `train.max_steps=2` | 2 | {spread} | {min(rsums):.1f}-{max(rsums):.1f} |")
    exits = ", ".join("never" if run["plateau_exit_step"] is None else str(run["plateau_exit_step"]) for run in runs)
    assert table[2].endswith(f"| {exits} | {statistics.median(run['minutes'] for run in runs):.1f} |")


def test_seed_spread_names_the_seed_and_log_of_a_failed_stage(tiny_pipeline, tmp_path):
    project = copy_finished(tiny_pipeline, tmp_path / "project")
    result = subprocess.run([sys.executable, "benchmarks/seed_spread.py", "--project", str(project), "--label", "bad", "--seeds", "3",
                             "-S", "train.lr=-1"], cwd=REPO, capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode != 0
    log = project / "outputs/seed-spread/bad/seed3/log.txt"
    assert f"error: seed 3: `avse train` failed, see {log}" in result.stderr
    assert "train.lr" in log.read_text()


def test_heldout_scenes_are_a_flickr30k_layout_of_three_objects_in_words_the_embedded_set_does_not_use(tmp_path):
    import json

    from avse.data import synthetic
    from avse.data.formats import read_caption_splits, read_id_mapping

    run_benchmark("benchmarks/heldout_scenes.py", "--out", str(tmp_path / "heldout"), "--train", "4", "--dev", "2", "--test", "2")
    captions = tmp_path / "heldout" / "captions"
    dataset = read_caption_splits(captions, ("train", "dev", "test"))
    assert dataset.problems == []
    assert {name: len(split.captions) for name, split in dataset.splits.items()} == {"train": 20, "dev": 10, "test": 10}
    mapping = read_id_mapping(captions / "id_mapping.json")
    assert len(mapping) == 8 and all((tmp_path / "heldout" / "images" / name).is_file() for name in mapping.values())
    scenes = [json.loads(line) for line in (captions / "scenes.jsonl").read_text().splitlines()]
    assert len(scenes) == 8 and all(len(scene["objects"]) == 3 for scene in scenes)
    words = {word for split in dataset.splits.values() for caption in split.captions for word in caption.text.split()}
    assert not words & {*synthetic.SHAPES, *synthetic.COLOURS}
