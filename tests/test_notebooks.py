"""The notebooks run end to end (tiny settings, in their own kernel) and save readable-size figures; the
committed notebooks carry no outputs."""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
FIGURES = {
    "quickstart": ["quickstart_reward_accuracy"],
    "timing": ["timing_phases", "timing_reward"],
    "custom_reward": ["custom_reward_effect"],
}


def test_every_notebook_is_covered():
    assert {p.stem for p in NOTEBOOKS} == set(FIGURES)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebooks_carry_no_outputs(path):
    book = nbformat.read(path, as_version=4)
    for cell in book.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{path.name}: strip outputs before committing"
            )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_and_saves_its_figures(path, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("LIT_DASH_NB_TINY", "1")
    monkeypatch.setenv("LIT_DASH_NB_OUT", str(tmp_path))
    for name in ("LIT_DASH_NB_STEPS", "LIT_DASH_NB_GRPO_RUN", "LIT_DASH_NB_DASH_RUN"):
        monkeypatch.delenv(name, raising=False)
    book = nbformat.read(path, as_version=4)
    book.cells.append(
        nbformat.v4.new_code_cell("import sys, lit_dash; print(sys.executable, lit_dash.__file__)")
    )
    # the kernel is this interpreter (jupyter_client maps the spec's "python" to sys.executable), started in
    # notebooks/ as a user's Jupyter would; the notebook finds the repository root itself
    client = NotebookClient(
        book, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
    errors = [o for c in book.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    # this interpreter, and this checkout's lit_dash (not another installed copy)
    assert book.cells[-1].outputs[0]["text"].split() == [
        sys.executable,
        str(REPO / "lit_dash" / "__init__.py"),
    ]
    for figure in FIGURES[path.stem]:
        png = tmp_path / path.stem / f"{figure}.png"
        assert png.exists(), f"{path.name} did not save {png.name}"
        assert png.stat().st_size > 20_000, f"{png.name} is {png.stat().st_size} bytes: an empty plot?"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
