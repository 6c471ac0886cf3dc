"""The tiers conftest.py marks each test with (tests/tiers.py), on functions written to use each thing."""

from __future__ import annotations

import subprocess

from fitting import fit
from tiers import slow_names

from lit_dash.cli import build_cli


def _plain():
    return sum(range(3))


def _fits():
    fit(None, None)


def _runs_a_process():
    subprocess.run(["true"], check=True)


def _through_a_helper():
    return _runs_a_process()


class _Recorder:
    def on_end(self):
        _fits()


def _through_a_class():
    return _Recorder().on_end()


def _parses_a_config():
    build_cli(["--config", "configs/demo.yaml"], run=False)


def _fits_through_the_cli():
    build_cli(["fit", "--config", "configs/demo.yaml"])


def _inner_function():
    def inner():
        subprocess.check_call(["true"])

    return inner


def test_what_a_test_uses_decides_its_tier():
    assert slow_names(_plain) == set()  # the control: nothing slow
    assert slow_names(_fits) == {"fit"}
    assert slow_names(_runs_a_process) == {"subprocess"}
    assert slow_names(_through_a_helper) == {"subprocess"}  # followed into the test module's helpers
    assert slow_names(_through_a_class) == {"fit"}  # and into a helper class's methods
    assert slow_names(_parses_a_config) == set()  # parsing a config is cheap
    assert slow_names(_fits_through_the_cli) == {"build_cli"}
    assert slow_names(_inner_function) == {"subprocess"}  # nested code counts


def test_the_collected_suite_is_tiered(request):
    """Whatever this session collected: a test using an engine fixture is marked engine, and nothing
    marked slow by hand is left out of the slow tier."""
    for item in request.session.items:
        names = {m.name for m in item.iter_markers()}
        if {"tiny_engine", "smollm2_engine"} & set(item.fixturenames):
            assert "engine" in names, item.nodeid
        if "smollm2_path" in item.fixturenames or "smollm2_engine" in item.fixturenames:
            assert "slow" in names, item.nodeid
