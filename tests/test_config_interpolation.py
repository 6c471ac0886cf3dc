"""omegaconf+ interpolation in a shipped recipe: resolved after the command line, so overrides propagate."""

from __future__ import annotations

import pytest
from support import REPO

from lit_dash.cli import build_cli

RECIPE = str(REPO / "configs" / "paper" / "qwen05b_math_grpo.yaml")  # eval_max_new_tokens: ${.sampling...}


def _data(monkeypatch, *overrides: str):
    monkeypatch.chdir(REPO)  # the recipe names ../shared/data relative to the repo root
    return build_cli(["--config", RECIPE, *overrides], run=False, instantiate=False).config.data.init_args


def test_the_recipe_interpolates_its_eval_budget(monkeypatch):
    data = _data(monkeypatch)
    assert data.sampling.max_new_tokens == 2048 and data.eval_max_new_tokens == 2048


@pytest.mark.parametrize("key", ["data.sampling.max_new_tokens", "data.init_args.sampling.max_new_tokens"])
def test_a_command_line_override_reaches_the_interpolated_key(monkeypatch, key):
    # Plain "omegaconf" mode resolves when the file is read and would leave eval_max_new_tokens at 2048.
    data = _data(monkeypatch, f"--{key}", "32")
    assert data.sampling.max_new_tokens == 32 and data.eval_max_new_tokens == 32


def test_an_explicit_value_still_beats_the_interpolation(monkeypatch):
    data = _data(monkeypatch, "--data.sampling.max_new_tokens", "32", "--data.eval_max_new_tokens", "100")
    assert data.sampling.max_new_tokens == 32 and data.eval_max_new_tokens == 100
