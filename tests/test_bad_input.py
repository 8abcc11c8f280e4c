"""Bad command-line input ends with one `error: ...` line and exit status 2, before any work or output; output into
a pipe whose reader has gone ends quietly."""

import os
import subprocess
import sys

import pytest

from avse import cli

from conftest import command_env

PARAMS = ["--params", os.devnull]  # an empty parameters file: every parameter at its default


def refused(capsys, *args: str) -> str:
    """What `avse ARGS` prints on stderr, after checking that it exits with status 2."""
    assert cli.main([*args]) == 2
    return capsys.readouterr().err


def test_embed_split_is_a_split_name_never_a_path(tmp_path, monkeypatch, capsys):
    # `embeddings/<split>/` is replaced when embedding, so a path here would replace a folder outside the project.
    monkeypatch.chdir(tmp_path)
    assert refused(capsys, "embed", *PARAMS, "-S", "embed.split=../../../victim") == (
        "error: embed.split: '../../../victim' is not one of train, dev, test, testall\n")
    assert list(tmp_path.iterdir()) == []


def test_a_dry_run_of_no_steps_is_refused(capsys):
    assert refused(capsys, "train", *PARAMS, "--dry-run", "--steps", "0", "-S", "train.batch_size=2") == (
        "error: --steps: 0 is not a positive integer\n")


def test_search_for_no_results_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert refused(capsys, "search", "a red circle", *PARAMS, "-k", "0", "--out", "grid.png") == "error: -k: 0 is not a positive integer\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("out", ["{folder}", "grid"], ids=["folder", "no suffix"])
def test_search_writes_only_a_png_file_it_is_named(tmp_path, monkeypatch, capsys, out):
    # matplotlib adds `.png` to a name without a suffix: `--out <folder>` wrote `<folder>.png` and said `wrote <folder>`.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    out = out.format(folder=tmp_path / "folder")
    assert refused(capsys, "search", "a red circle", *PARAMS, "--out", out) == f"error: --out {out}: expected the name of a .png file to write\n"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["folder"]


def test_output_into_a_pipe_closed_early_ends_quietly(tmp_path):
    """`avse params | head`: the reader leaves before the output ends; no traceback, the status of a tool SIGPIPE ended."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # gone before the first line
    try:
        result = subprocess.run([sys.executable, "-m", "avse.cli", "params", *PARAMS], stdout=write_end, stderr=subprocess.PIPE,
                                text=True, cwd=tmp_path, env=command_env(tmp_path), timeout=60)
    finally:
        os.close(write_end)
    assert (result.returncode, result.stderr) == (141, "")
