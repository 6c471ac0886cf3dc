"""The console: a tiny fit through the CLI prints only lit_dash's own lines and an allow-list of library
lines, each allowed for a reason; LIT_DASH_VERBOSE=1 brings the dropped lines back (the negative control).
Plus the filters and the engine-progress plumbing on their own, without an engine."""

from __future__ import annotations

import logging
import re
import subprocess
import warnings
from pathlib import Path

import torch
from support import REPO, cli_command, cli_env

from lit_dash import console

# a config that asks for the CPU on a machine with a GPU (tiny.yaml: accelerator cpu): Lightning's advice
GPU_UNUSED = r".*GPU available but not used\. You can set it by doing `Trainer\(accelerator='gpu'\)`\.?"

# Every line a quiet fit may print, and why. Anything else (a library warning, a tip, a progress bar
# redraw) fails the test.
ALLOWED = (
    (r"\[lit_dash\] .*", "lit_dash's own lines: start-up, run summary, one line per step, evaluations"),
    (r"  (model|precision|rollout|batches|update|budget|seed|run dir) +\S.*", "the run summary's fields"),
    (r"\|.*\|", "the evaluation tables"),
    (r"  \w+: \d+\.\d%.*", "the final held-out summary, one line per eval set"),
    (r"`Trainer\.fit` stopped: `max_steps=\d+` reached\.", "Lightning says why the fit ended"),
    (r"", "blank lines around the tables"),
)
# only where there is a GPU the config leaves unused: Lightning's line then (tiny.yaml trains on the CPU)
ON_A_GPU_MACHINE = ((GPU_UNUSED, "Lightning's advice to use the GPU a config left unused"),)


def allowed_lines(gpu: bool) -> re.Pattern:
    patterns = ALLOWED + (ON_A_GPU_MACHINE if gpu else ())
    return re.compile("|".join(f"(?:{pattern})" for pattern, _ in patterns))


def rejected(output: str, gpu: bool | None = None) -> list[str]:
    """The lines of ``output`` no entry allows (``gpu``: whether this machine has one; None: look)."""
    allowed = allowed_lines(torch.cuda.is_available() if gpu is None else gpu)
    return [line for line in output.splitlines() if not allowed.fullmatch(line)]


def test_the_gpu_line_is_allowed_only_where_a_gpu_is():
    line = (
        "/x/lightning/pytorch/trainer/setup.py:175: GPU available but not used. You can set it by doing "
        "`Trainer(accelerator='gpu')`."
    )
    assert rejected(line, gpu=True) == []
    assert rejected(line, gpu=False) == [line]
    assert rejected("GPU available: True (cuda), used: False", gpu=True) != []  # the filter's, not allowed


def _fit(root: Path, *extra: str, verbose: bool = False) -> str:
    env = cli_env()
    env.pop(console.VERBOSE_ENV, None)
    if verbose:
        env[console.VERBOSE_ENV] = "1"
    cmd = cli_command(
        "fit", "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "true", *extra
    )
    proc = subprocess.run(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    return proc.stdout


def test_a_fit_prints_only_what_a_user_needs(tmp_path):
    output = _fit(tmp_path / "quiet")
    assert rejected(output) == []
    assert "\r" not in output  # output to a file / pipe: no progress-bar redraws
    assert "[lit_dash] run summary" in output and "  budget     2 optimizer steps" in output
    assert re.search(r"^\[lit_dash\] step 1/2 \| reward \d\.\d{3}, kept 100% \|", output, re.M), output
    assert "[lit_dash] step 2/2 |" in output
    assert output.count("[lit_dash] evaluation at step") == 3  # steps 0, 1, 2
    assert "Epoch" not in output

    # negative control: the same fit, verbose, prints the library lines the allow-list rejects
    loud = rejected(_fit(tmp_path / "verbose", "--trainer.max_steps", "1", verbose=True))
    text = "\n".join(loud)
    # Lightning's device line and its eval-mode warning everywhere; vLLM's LD_PRELOAD tip on its CPU
    # backend only
    expected = ["GPU available", "in eval mode at the start of training"]
    expected += [] if torch.cuda.is_available() else ["LD_PRELOAD"]
    for line in expected:
        assert line in text, text


def test_the_filters_drop_exactly_their_lines():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console.quiet()
        for message, module in (
            ("Found 33 module(s) in eval mode at the start of training. This may", "lightning.pytorch.loops"),
            ("Found 33 module(s) in eval mode at the start of training.", "my_package.train"),
            ("`torch.distributed.reduce_op` is deprecated", "vllm.triton_utils.dispatcher"),
            ("skipped 3 of 40 training prompts longer than max_prompt_tokens=8", "lit_dash.data"),
        ):
            warnings.warn_explicit(message, UserWarning, "x.py", 1, module=module)
    # the same message from another package is not Lightning's and is shown; lit_dash's own is shown
    assert [str(w.message)[:20] for w in caught] == ["Found 33 module(s) i", "skipped 3 of 40 trai"]

    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep()
    logger.addHandler(handler)
    try:
        for message in ("GPU available: False, used: False", "[lit_dash] evaluation at step 0 (2 s)"):
            logger.warning(message)
    finally:
        logger.removeHandler(handler)
    assert records == ["[lit_dash] evaluation at step 0 (2 s)"]
    assert logging.getLogger("vllm").level == logging.ERROR


def test_engine_progress_reports_completions_to_the_sink_only():
    seen = []
    assert console.engine_progress() is False  # no sink: vLLM draws nothing
    console.set_status_sink(lambda label, done, total, elapsed: seen.append((label, done, total)))
    try:
        factory = console.engine_progress()
        assert list(factory(["a", "b"], desc="Rendering prompts")) == ["a", "b"]  # vLLM's iterable use
        with console.phase("evaluating arithmetic"):
            bar = factory(total=3, desc="Processed prompts")
            bar.update(2)
            bar.update(1)
            bar.close()
        bar = factory(total=8)
        bar.update(8)
    finally:
        console.set_status_sink(None)
    assert seen == [
        ("evaluating arithmetic", 2, 3),
        ("evaluating arithmetic", 3, 3),
        (None, 3, 3),
        ("sampling", 8, 8),
    ]
