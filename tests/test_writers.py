"""One writer per output, outputs written as a set, and stages that end with one line: a second writer, a disk that fills
up, read-only folders and stop signals."""

import builtins
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from avse import cli
from avse.checkpoint import save_tensors
from avse.data import prepare as prepare_module

from conftest import REPO, FullDisk, command_env, copy_finished
from test_prepare import make_raw

# Holds the writer locks of models/ and of the prepared synthetic dataset until told to let go.
HOLDER = """
import sys
from avse.io import writer_lock
with writer_lock("models"), writer_lock("data/prepared/synthetic"):
    print("holding", flush=True)
    sys.stdin.readline()
"""


def test_a_second_writer_fails_at_once_naming_the_first(tmp_path, monkeypatch, capsys):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER], cwd=tmp_path, env=command_env(REPO), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "holding\n"
        for command, output in (("train", "models"), ("prepare", "data/prepared/synthetic")):
            assert cli.main([command]) == 2
            assert capsys.readouterr().err == (f"error: {output}: already being written by pid {holder.pid} (-c); "
                                               "wait for it to finish, or stop it\n")
    finally:
        holder.communicate("\n", timeout=30)
    assert holder.returncode == 0
    assert [p.name for p in tmp_path.iterdir()] == ["params.yaml"]  # no lock file, nor the folders made for one


def write_embeddings(project: Path, seed: int) -> None:
    """Embeddings of 4 images with 5 captions each, as the embed stage writes them, and the prepared test split."""
    generator = torch.Generator().manual_seed(seed)
    folder = project / "embeddings" / "test"
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors({"embeddings": torch.randn(4, 32, generator=generator), "image_ids": torch.arange(4)}, folder / "images.pt")
    save_tensors({"embeddings": torch.randn(20, 16, generator=generator), "caption_image": torch.arange(20) // 5}, folder / "captions.pt")
    meta = {"block_dim": 16, "matching": "max", "dustbin": 0.0, "sinkhorn_iters": 20}
    (folder / "meta.json").write_text(json.dumps(meta))
    prepared = project / "data" / "prepared" / "synthetic"
    prepared.mkdir(parents=True, exist_ok=True)
    rows = [f"{i},{i}.jpg,images/{i}.jpg,caption {k} of image {i}" for i in range(4) for k in range(5)]
    (prepared / "test.csv").write_text("image_id,image_file,image_path,caption\n" + "\n".join(rows) + "\n")


def test_a_full_disk_while_evaluating_keeps_the_previous_results_whole(tmp_path, monkeypatch, capsys):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    write_embeddings(tmp_path, seed=0)
    assert cli.main(["evaluate"]) == 0
    results = ["metrics/eval.json", "metrics/recall_curve.csv", "metrics/recall_curve.png", "outputs/eval/t2i.csv", "outputs/eval/i2t.csv"]
    before = {name: (tmp_path / name).read_bytes() for name in results}
    write_embeddings(tmp_path, seed=1)  # other scores: every result would change
    opened = Path.open
    # The disk fills up in the middle of t2i.csv, the first per-query file.
    monkeypatch.setattr(Path, "open", lambda path, mode="r", *args, **kwargs: (
        FullDisk(opened(path, mode, *args, **kwargs), room=500) if path.name == "t2i.csv" else opened(path, mode, *args, **kwargs)))
    capsys.readouterr()
    assert cli.main(["evaluate"]) == 2
    assert capsys.readouterr().err == ("error: metrics/eval.json, metrics/recall_curve.csv, metrics/recall_curve.png, outputs/eval: "
                                       "not written, the disk is full (No space left on device); any previous version is kept\n")
    assert {name: (tmp_path / name).read_bytes() for name in results} == before
    assert sorted(p.name for p in (tmp_path / "metrics").iterdir()) == ["eval.json", "recall_curve.csv", "recall_curve.png"]
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["eval"]


def read_only(monkeypatch, folder: Path) -> None:
    """`folder` as on a read-only file system: creating or opening for writing anything in it fails with EROFS."""
    folder = folder.resolve()
    make_folder, open_descriptor, open_file = os.mkdir, os.open, io.open

    def refused(path) -> bool:
        return folder in Path(path).resolve().parents

    def erofs(path) -> OSError:
        return OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    def mkdir(path, *args, **kwargs):
        if refused(path) and not os.path.exists(path):
            raise erofs(path)
        return make_folder(path, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if refused(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise erofs(path)
        return open_descriptor(path, flags, *args, **kwargs)

    def open_(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and refused(file) and set(mode) & set("wax+"):
            raise erofs(file)
        return open_file(file, mode, *args, **kwargs)

    for module, name, replacement in ((os, "mkdir", mkdir), (os, "open", os_open), (io, "open", open_), (builtins, "open", open_)):
        monkeypatch.setattr(module, name, replacement)


@pytest.mark.parametrize("folder, command, output", [
    ("metrics", ["evaluate"], "metrics/eval.json"),
    ("models", ["train", "-S", "tracking.enabled=false"], "models/tokenizer"),
    ("embeddings", ["embed"], "embeddings/test"),
    ("data/prepared", ["prepare"], "data/prepared/synthetic"),
], ids=["metrics", "models", "embeddings", "data-prepared"])
def test_a_read_only_output_folder_stops_the_stage_with_one_line(tiny_pipeline, tmp_path, monkeypatch, capsys, folder, command, output):
    project = copy_finished(tiny_pipeline, tmp_path / "project")
    monkeypatch.chdir(project)
    before = sorted(p.name for p in (project / folder).iterdir())
    with monkeypatch.context() as patched:
        read_only(patched, project / folder)
        assert cli.main(command) == 2
    parent = str(Path(output).parent)
    assert capsys.readouterr().err.splitlines()[-1] == (  # after the progress bars
        f"error: {output}: not written, cannot write in {parent} (Read-only file system); any previous version is kept")
    assert sorted(p.name for p in (project / folder).iterdir()) == before


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_during_prepare_ends_it_with_one_line_and_no_temporaries(tmp_path, monkeypatch, capsys, signum):
    caps_dir, image_dir = make_raw(tmp_path)
    params = {"data": {"dataset": "f30k", "root": str(caps_dir), "images": str(image_dir), "cache_res": 4, "vocab_size": 100}}
    (tmp_path / "params.yaml").write_text(json.dumps(params))
    monkeypatch.chdir(tmp_path)
    load_rgb = prepare_module.load_rgb
    first = threading.Lock()  # never released: the first of the loading threads alone sends the signal

    def load_and_signal_once(path):  # the signal comes while the images are read
        if first.acquire(blocking=False):
            os.kill(os.getpid(), signum)
            time.sleep(0.2)
        return load_rgb(path)

    monkeypatch.setattr(prepare_module, "load_rgb", load_and_signal_once)
    received = []
    previous = signal.signal(signum, lambda *args: received.append(args))  # where the stage would not listen for it
    try:
        status = cli.main(["prepare"])
    finally:
        signal.signal(signum, previous)
    err = capsys.readouterr().err
    assert (status, received) == (2, [])
    assert err.splitlines()[-1] == f"error: interrupted by {signum.name}; no output was left half-written"
    assert "Traceback" not in err
    assert not (tmp_path / "data").exists()  # no temporary, no lock file, nor the folders made for them
