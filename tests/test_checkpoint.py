import argparse
from unittest import mock

import pytest
import torch

from avse.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


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


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path):
    save_checkpoint(tmp_path / "last.pt", {"step": 1})
    with mock.patch("torch.save", side_effect=OSError(28, "No space left on device")):
        with pytest.raises(OSError, match="No space left"):
            save_checkpoint(tmp_path / "last.pt", {"step": 2})
    assert load_checkpoint(tmp_path / "last.pt") == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary left behind
