import argparse

import pytest
import torch

from avse.errors import DiskFullError
from avse.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

from conftest import fill_disk_after


def test_round_trip_of_plain_state(tmp_path):
    state = {"model": {"w": torch.arange(3.0)}, "step": 7, "config": {"lr": 0.1, "milestones": [1, 2], "name": "x"}}
    save_checkpoint(tmp_path / "last.pt", state)
    loaded = load_checkpoint(tmp_path / "last.pt")
    assert loaded["step"] == 7 and loaded["config"] == state["config"]
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])


def test_pickled_objects_are_refused(tmp_path):
    # The official checkpoints hold an argparse.Namespace: loading it would execute pickled code.
    torch.save({"model": {}, "opt": argparse.Namespace(lr=0.1)}, tmp_path / "official.pth")
    with pytest.raises(CheckpointError, match=r"official.pth: refused to load: it holds pickled Python objects"):
        load_checkpoint(tmp_path / "official.pth")


def test_missing_and_corrupt_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"nothing.pt: checkpoint not found"):
        load_checkpoint(tmp_path / "nothing.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"bad.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")


def test_a_full_disk_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / "last.pt", {"step": 1})
    before = (tmp_path / "last.pt").read_bytes()
    fill_disk_after(monkeypatch, room=4096)
    with pytest.raises(DiskFullError) as err:
        save_checkpoint(tmp_path / "last.pt", {"step": 2, "model": {"w": torch.zeros(10_000)}})
    assert str(err.value) == f"{tmp_path / 'last.pt'}: not written, the disk is full (No space left on device); any previous version is kept"
    assert (tmp_path / "last.pt").read_bytes() == before and load_checkpoint(tmp_path / "last.pt") == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary left behind
