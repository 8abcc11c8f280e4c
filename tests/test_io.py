"""Atomic output under failure: a writer killed mid-write, another writer of the same file, and a disk that is really full."""

import json
import shutil
import subprocess
import sys

import pytest

from avse.checkpoint import load_checkpoint, save_checkpoint
from avse.io import write_text

from conftest import REPO, command_env

# Writes half a file through atomic_path, says so, and waits to be killed.
KILLED_WRITER = """
import sys, time
from avse.io import atomic_path
with atomic_path(sys.argv[1]) as tmp, open(tmp, "wb") as f:
    f.write(b"half a checkpoint")
    f.flush()
    print("writing", flush=True)
    time.sleep(60)
"""

# Writes half a file through atomic_path, says so, and finishes it when told to.
LIVE_WRITER = """
import sys
from avse.io import atomic_path
with atomic_path(sys.argv[1]) as tmp, open(tmp, "w") as f:
    f.write("the first writer's ")
    f.flush()
    print("writing", flush=True)
    f.write(sys.stdin.readline())
"""

# Run on a 256 KiB tmpfs: a checkpoint that fits, then a bigger one that does not fit beside it.
FULL_DISK_WRITER = """
import json, os, sys, torch
from avse.errors import DiskFullError
from avse.checkpoint import load_checkpoint, save_checkpoint
target = os.path.join(sys.argv[1], "last.pt")
save_checkpoint(target, {"step": 1, "w": torch.zeros(20_000)})
before = open(target, "rb").read()
try:
    save_checkpoint(target, {"step": 2, "w": torch.zeros(50_000)})
    error = None
except DiskFullError as err:
    error = str(err)
print(json.dumps({"error": error, "unchanged": open(target, "rb").read() == before,
                  "step": load_checkpoint(target)["step"], "files": sorted(os.listdir(sys.argv[1]))}))
"""


def test_a_writer_killed_mid_write_leaves_the_previous_file_and_the_next_write_clears_its_leftover(tmp_path):
    target = tmp_path / "last.pt"
    save_checkpoint(target, {"step": 1})
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)], stdout=subprocess.PIPE, text=True, env=command_env(REPO))
    try:
        assert writer.stdout.readline() == "writing\n"
    finally:
        writer.kill()
        writer.wait()
    assert load_checkpoint(target) == {"step": 1}
    (leftover,) = [p for p in tmp_path.iterdir() if p != target]  # a killed writer cannot clean up
    assert leftover.read_bytes() == b"half a checkpoint"
    save_checkpoint(target, {"step": 2})
    assert load_checkpoint(target) == {"step": 2}
    assert list(tmp_path.iterdir()) == [target]


def test_a_really_full_disk_keeps_the_previous_checkpoint(tmp_path):
    """A real ENOSPC from the kernel, on a tmpfs mounted in a user namespace (skipped where that is not allowed)."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare not found")
    disk = tmp_path / "disk"
    disk.mkdir()
    script = 'mount -t tmpfs -o size=256k tmpfs "$1" || exit 77; exec "$2" -c "$3" "$1"'
    result = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", str(disk), sys.executable, FULL_DISK_WRITER],
        capture_output=True, text=True, env=command_env(REPO), timeout=120,
    )
    if result.returncode == 77 or (result.returncode and "unshare" in result.stderr):
        pytest.skip(f"cannot mount a tmpfs without root here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    assert outcome["error"] == f"{disk / 'last.pt'}: not written, the disk is full (No space left on device); any previous version is kept"
    assert outcome["unchanged"] and outcome["step"] == 1
    assert outcome["files"] == ["last.pt"]


def test_a_live_writers_temporary_is_left_alone_by_another_write_of_the_same_file(tmp_path):
    target = tmp_path / "run.json"
    writer = subprocess.Popen([sys.executable, "-c", LIVE_WRITER, str(target)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=command_env(REPO))
    try:
        assert writer.stdout.readline() == "writing\n"
        write_text(target, "the second writer's")
        assert target.read_text() == "the second writer's"
    finally:
        writer.communicate("whole file\n", timeout=30)
    assert writer.returncode == 0  # its temporary was still there to rename
    assert target.read_text() == "the first writer's whole file\n"
    assert list(tmp_path.iterdir()) == [target]
