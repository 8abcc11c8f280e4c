"""The notebooks: stored without outputs, in sync with their py:percent scripts, and running headless on a tiny pipeline run."""

import jupytext
import nbformat
import pytest
from jupytext.config import load_jupytext_config
from nbclient import NotebookClient

from conftest import REPO

NOTEBOOKS = REPO / "notebooks"
# Figures each notebook shows on a synthetic-data run tracked as one MLflow run.
FIGURES = {"compare_runs": 7, "failure_analysis": 12}


def test_notebooks_are_paired_with_scripts_in_sync_and_stored_without_outputs():
    pairing = load_jupytext_config(str(NOTEBOOKS))  # notebooks/jupytext.toml
    assert pairing is not None and pairing.default_formats(str(NOTEBOOKS / "any.ipynb")) == "ipynb,py:percent"
    assert sorted(path.stem for path in NOTEBOOKS.glob("*.ipynb")) == sorted(FIGURES)
    assert sorted(path.stem for path in NOTEBOOKS.glob("*.py")) == sorted(FIGURES)
    for name in FIGURES:
        stored = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        with_outputs = [i for i, cell in enumerate(stored.cells) if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)]
        assert not with_outputs, f"notebooks/{name}.ipynb: cells {with_outputs} have outputs; clear them before committing"
        script = jupytext.read(NOTEBOOKS / f"{name}.py")
        assert [(cell.cell_type, cell.source) for cell in stored.cells] == [(cell.cell_type, cell.source) for cell in script.cells], (
            f"notebooks/{name}.ipynb and .py differ: run `jupytext --sync notebooks/{name}.py`")


@pytest.fixture
def python3_kernel(tmp_path, monkeypatch):
    """A `python3` kernel that runs this interpreter, found before any kernel installed on the machine."""
    from ipykernel.kernelspec import write_kernel_spec

    write_kernel_spec(tmp_path / "jupyter" / "kernels" / "python3")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return "python3"


def test_notebooks_run_headless_on_a_pipeline_run(tiny_pipeline, python3_kernel, monkeypatch):
    project = tiny_pipeline
    monkeypatch.setenv("AVSE_PROJECT", str(project))
    monkeypatch.setenv("PYTHONPATH", str(project))
    written = project_files(project)
    for name, figures in FIGURES.items():
        notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        # A cell that raises fails the test with its traceback (CellExecutionError).
        NotebookClient(notebook, kernel_name=python3_kernel, timeout=120, resources={"metadata": {"path": str(project)}}).execute()
        shown = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs if "image/png" in output.get("data", {})]
        assert len(shown) == figures, f"{name}: {len(shown)} figures shown, expected {figures}"
    assert project_files(project) == written  # the notebooks only read the pipeline's outputs


def project_files(project):
    """Every file of the project but Python's bytecode caches, with its modification time."""
    return {path: path.stat().st_mtime_ns for path in project.rglob("*") if path.is_file() and "__pycache__" not in path.parts}
