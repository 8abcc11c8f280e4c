"""`train.gpus: auto`: runs side by side on one machine each lease GPUs no other run holds (`avse/launch/leases.py`),
tested on the CPU with concurrent processes and a device list given by the test."""

import json
import os
import signal
import subprocess
import sys
import time

from conftest import REPO

# One process of the test: lease $COUNT of GPUs 0 and 1, say when, hold them $HOLD seconds, say when they went back.
HOLDER = """
import json, os, sys, time
from pathlib import Path
from avse.launch.leases import gpu_lease
with gpu_lease(int(sys.argv[1]), ["0", "1"], Path(sys.argv[2]), wait_seconds=0.05) as leased:
    start = time.time()
    print(json.dumps({"leased": leased, "start": start}), flush=True)
    time.sleep(float(sys.argv[3]))
print(json.dumps({"end": time.time()}), flush=True)
"""


def holder(count: int, folder, hold: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(count), str(folder), str(hold)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ | {"PYTHONPATH": str(REPO)})


def test_three_one_gpu_runs_on_two_gpus_never_share_one_and_the_third_waits(tmp_path):
    runs = [holder(1, tmp_path, 1.5) for _ in range(3)]
    records = []
    for run in runs:
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0, err
        lines = [json.loads(line) for line in out.splitlines()]
        records.append({"gpu": lines[0]["leased"], "start": lines[0]["start"], "end": lines[1]["end"]})
    assert all(len(r["gpu"]) == 1 for r in records)
    for a in records:
        for b in records:
            overlapping = a is not b and a["start"] < b["end"] and b["start"] < a["end"]
            assert not (overlapping and a["gpu"] == b["gpu"]), records
    first, second, third = sorted(records, key=lambda r: r["start"])
    assert third["start"] >= min(first["end"], second["end"])  # it waited for one to be given back


def test_a_killed_run_gives_its_gpus_back(tmp_path):
    doomed = holder(2, tmp_path, 600)
    assert "leased" in doomed.stdout.readline()
    waiting = holder(1, tmp_path, 0)
    time.sleep(0.5)
    assert waiting.poll() is None  # both GPUs are held
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0 and json.loads(out.splitlines()[0])["leased"] in (["0"], ["1"]), err


def test_more_gpus_than_there_are_is_refused(tmp_path):
    result = subprocess.run([sys.executable, "-c", HOLDER, "3", str(tmp_path), "0"], cwd=REPO, capture_output=True, text=True,
                            env=os.environ | {"PYTHONPATH": str(REPO)})
    assert result.returncode != 0 and "train.gpus: auto leases train.nproc_per_node = 3 GPUs, but there are 2" in result.stderr


def test_the_gpus_a_scheduler_allocated_are_the_ones_leased(monkeypatch):
    from avse.launch.leases import leasable_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 3")
    assert leasable_gpus() == ["2", "3"]


def test_a_leased_run_sees_only_its_gpus(monkeypatch, tmp_path):
    from avse.launch.leases import LEASE_DIR_VARIABLE, leased_visible_gpus

    monkeypatch.setenv(LEASE_DIR_VARIABLE, str(tmp_path))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,6")
    with leased_visible_gpus(1) as leased:
        assert leased == ["5"] and os.environ["CUDA_VISIBLE_DEVICES"] == "5"
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,6")  # another run started alongside
        with leased_visible_gpus(1) as other:
            assert other == ["6"] and os.environ["CUDA_VISIBLE_DEVICES"] == "6"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr("avse.launch.leases.subprocess.run", lambda *a, **k: (_ for _ in ()).throw(OSError("no nvidia-smi")))
    with leased_visible_gpus(2) as none:  # a machine without GPUs: nothing to lease
        assert none == [] and "CUDA_VISIBLE_DEVICES" not in os.environ
