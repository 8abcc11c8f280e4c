import argparse
import os
import re
import zipfile

import pytest
import torch

from avse import cli
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


def test_a_compressed_checkpoint_is_refused_before_it_unpacks(tmp_path, capsys):
    """A zip bomb for `avse import-checkpoint`: 8 MB of zeros deflated to a few KB. torch.save never compresses,
    so the sizes the archive declares are checked against the file's before anything is unpacked."""
    torch.save({"model": {"w": torch.zeros(2_000_000)}}, tmp_path / "plain.pt")
    bomb = tmp_path / "model_best.pth"
    with zipfile.ZipFile(tmp_path / "plain.pt") as plain, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as packed:
        for entry in plain.infolist():
            packed.writestr(entry.filename, plain.read(entry))
    assert cli.main(["import-checkpoint", str(bomb), "--params", os.devnull, "--out", str(tmp_path / "models")]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(rf"error: {re.escape(str(bomb))}: refused to load: its entries unpack to 8\d{{6}} bytes from a file of "
                        rf"{bomb.stat().st_size} \(torch.save writes them uncompressed\)\n", err), err
    assert not (tmp_path / "models").exists()


def test_a_full_disk_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / "last.pt", {"step": 1})
    before = (tmp_path / "last.pt").read_bytes()
    fill_disk_after(monkeypatch, room=4096)
    with pytest.raises(DiskFullError) as err:
        save_checkpoint(tmp_path / "last.pt", {"step": 2, "model": {"w": torch.zeros(10_000)}})
    assert str(err.value) == f"{tmp_path / 'last.pt'}: not written, the disk is full (No space left on device); any previous version is kept"
    assert (tmp_path / "last.pt").read_bytes() == before and load_checkpoint(tmp_path / "last.pt") == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary left behind
