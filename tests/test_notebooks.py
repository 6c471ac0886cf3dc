"""The notebooks run end to end (tiny settings, in their own kernel) and save readable-size figures; the
committed notebooks carry no outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from figures import drawn_colours
from support import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
# inserted after the notebook's ``save`` helper: every saved figure's plotted data, by figure name
RECORD_FIGURES = """
_SAVED_FIGURES, _save_png = {}, save


def save(fig, name):
    _SAVED_FIGURES[name] = [
        {
            "title": ax.get_title(),
            "lines": [[[float(x) for x in ln.get_xdata()], [float(y) for y in ln.get_ydata()]] for ln in ax.get_lines()],
            "heights": [float(p.get_height()) for p in ax.patches],
            "widths": [float(p.get_width()) for p in ax.patches],
        }
        for ax in fig.axes
    ]
    return _save_png(fig, name)
"""
REPORT = """
import json as _json
_runs = runs if "runs" in globals() else {"run": str(log_dir)}
print("FIGURE-DATA " + _json.dumps({"figures": _SAVED_FIGURES, "runs": {k: str(v) for k, v in _runs.items()}}))
"""
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
    at = next(i for i, c in enumerate(book.cells) if "def save(" in c.source)
    book.cells.insert(at + 1, nbformat.v4.new_code_cell(RECORD_FIGURES))
    book.cells.append(nbformat.v4.new_code_cell(REPORT))
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
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert drawn_colours(png) >= 2, f"{png.name}: nothing drawn in colour"
    (line,) = [x for x in book.cells[-2].outputs[0]["text"].splitlines() if x.startswith("FIGURE-DATA ")]
    report = json.loads(line.removeprefix("FIGURE-DATA "))
    assert sorted(report["figures"]) == sorted(FIGURES[path.stem])
    CHECK_PLOTTED[path.stem](report["figures"], {k: Path(v) for k, v in report["runs"].items()})


def _quickstart_plots_the_logged_scalars(figures: dict, runs: dict) -> None:
    """The reward, held-out accuracy and length lines are the run's TensorBoard scalars. (The tiny model
    scores 0 on the math reward, so the reward and accuracy values are 0 here: their step axes and the
    length line's values are what tell a wrong series apart; the percent scaling is not tested.)"""
    from lit_dash.logs import read_scalars

    scalars = read_scalars(runs["run"])
    reward, held_out = scalars["train/reward_mean"], scalars["eval/arithmetic/accuracy"]
    assert [s for s, _ in reward] == [0, 1] and [s for s, _ in held_out] == [
        0,
        2,
    ]  # 2 steps, eval at 0 and end
    ax_reward, ax_accuracy, ax_length = figures["quickstart_reward_accuracy"]  # the twin axes comes last
    length = scalars["train/completion_tokens_mean"]
    assert ax_length["lines"][0] == [[s for s, _ in length], [pytest.approx(v) for _, v in length]]
    assert ax_reward["lines"][0] == [[s for s, _ in reward], [pytest.approx(v) for _, v in reward]]
    assert ax_accuracy["lines"][0] == [
        [s for s, _ in held_out],
        [pytest.approx(100 * v) for _, v in held_out],
    ]


def _timing_plots_the_timing_files(figures: dict, runs: dict) -> None:
    """The stacked bars are each run's mean seconds per phase, from its timing.csv."""
    from lit_dash.logs import read_timing

    (bars,) = figures["timing_phases"]
    timing = {name: read_timing(path) for name, path in runs.items()}
    assert sorted(timing) == ["DASH", "GRPO"] and all(len(rows) == 2 for rows in timing.values())
    totals = {name: sum(r["total"] for r in rows) / len(rows) for name, rows in timing.items()}
    # one bar per (phase, run), phase by phase; per run they add up to its mean step
    widths = bars["widths"]
    assert len(widths) % 2 == 0 and widths
    for i, name in enumerate(["GRPO", "DASH"]):
        assert sum(widths[i::2]) == pytest.approx(totals[name], rel=1e-6)
    means = {name: sum(r["generation"] for r in rows) / len(rows) for name, rows in timing.items()}
    assert widths[:2] == [pytest.approx(means["GRPO"]), pytest.approx(means["DASH"])]  # generation first
    # the reward lines: each run's logged reward against its steps, and against its cumulative step time
    from lit_dash.logs import read_scalars

    ax_step, ax_time = figures["timing_reward"]
    for i, name in enumerate(["GRPO", "DASH"]):
        reward = read_scalars(runs[name], "train/")["train/reward_mean"]
        assert ax_step["lines"][i] == [[s for s, _ in reward], [pytest.approx(v) for _, v in reward]]
        elapsed = [sum(r["total"] for r in timing[name][: k + 1]) for k in range(len(reward))]
        assert ax_time["lines"][i] == [
            [pytest.approx(t) for t in elapsed],
            [pytest.approx(v) for _, v in reward],
        ]


def _custom_reward_plots_the_eval_files(figures: dict, runs: dict) -> None:
    """The "boxed" bars are the share of boxed completions in the first and last eval files."""
    from lit_dash.rewards import extract_answer

    files = sorted((runs["run"] / "eval").glob("arithmetic_fit_step*.jsonl"))
    shares = []
    for step in (0, 2):
        rows = [json.loads(x) for x in (runs["run"] / "eval" / f"arithmetic_fit_step{step}.jsonl").open()]
        shares.append(100 * sum(extract_answer(r["completion"]) is not None for r in rows) / len(rows))
    assert len(files) == 2
    bars = figures["custom_reward_effect"][0]["heights"]
    assert [bars[0], bars[3]] == [pytest.approx(v) for v in shares]  # before: 3 bars, then after: 3


CHECK_PLOTTED = {
    "quickstart": _quickstart_plots_the_logged_scalars,
    "timing": _timing_plots_the_timing_files,
    "custom_reward": _custom_reward_plots_the_eval_files,
}
