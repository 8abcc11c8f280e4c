"""The GPU check's own logic on the CPU: it stops without CUDA, looks the MFU peak up by device name, and counts what
torch.compile did (a compiled training step runs in `tests/test_benchmarks.py`'s run of `gpu_check.py --tiny`)."""

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from benchmarks.gpu import compilations, host_synchronizations, peak_tflops

REPO = Path(__file__).resolve().parents[1]


def test_without_cuda_the_check_stops_at_once_and_says_how_to_run_it_small():
    result = subprocess.run([sys.executable, "benchmarks/gpu_check.py"], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == ["error: no CUDA device; python benchmarks/gpu_check.py --tiny runs the same sections small "
                                          "on this machine"]


@pytest.mark.parametrize(("device_name", "peak"), [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0), ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.0), ("NVIDIA GeForce RTX 4090", None), ("cpu", None),
])
def test_the_mfu_peak_is_the_devices_own_and_none_for_an_unknown_device(device_name, peak):
    assert peak_tflops(device_name) == peak


def test_a_frame_past_the_recompile_limit_is_reported_as_run_eagerly():
    scaled = torch.compile(lambda x, factor: x * factor, backend="eager")  # Dynamo alone: no kernels to build
    with torch._dynamo.config.patch(recompile_limit=1), compilations() as compiled:
        for factor in (2, 3):  # the second fails the first compilation's guard on the factor
            assert torch.equal(scaled(torch.ones(2), factor), torch.full((2,), float(factor)))
    assert compiled["frames_compiled"] == 1 and compiled["recompiles"] == 0 and compiled["recompile_reasons"], compiled
    assert compiled["fell_back_to_eager"] and "recompile_limit" in compiled["fallback_reasons"][0], compiled


def test_host_synchronizations_are_counted_by_place_and_the_debug_mode_is_left_off(monkeypatch):
    """torch's sync debug mode itself needs a GPU: here its warnings are raised by hand."""
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    with host_synchronizations(torch.device("cuda")) as synchronizations:
        for _ in range(3):
            warnings.warn("called a synchronizing CUDA operation")  # one place, three times
        warnings.warn("something else")
    assert modes == ["warn", 0] and synchronizations["count"] == 3 and len(synchronizations["first"]) == 1
    assert synchronizations["first"][0].endswith(": called a synchronizing CUDA operation")


def test_host_synchronizations_are_not_applicable_on_the_cpu():
    with host_synchronizations(torch.device("cpu")) as synchronizations:
        pass
    assert synchronizations == {}
