"""Everything the README names exists: config files, notebooks, scripts, make targets, environment
variables, class paths, config keys, and every `lit-dash` command line parses against the code."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

from lit_dash.cli import build_cli

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
CODE = re.findall(r"```[a-z]*\n(.*?)```", README, flags=re.S) + re.findall(r"`([^`\n]+)`", README)
PATH = re.compile(r"\b((?:configs|notebooks|benchmarks|scripts|lit_dash|tests)/[\w./{},-]+\w)")


def _expand(path: str) -> list[str]:
    """``a/{b,c}.yaml`` -> ``a/b.yaml``, ``a/c.yaml``."""
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    return [q for part in m.group(1).split(",") for q in _expand(path[: m.start()] + part + path[m.end() :])]


def _lines(text: str) -> list[str]:
    return [line.split("#", 1)[0].strip() for line in text.splitlines()]


def _commands(program: str) -> list[list[str]]:
    """Argument lists after ``program`` in the README's code (code blocks and inline code)."""
    found = []
    for text in CODE:
        for line in _lines(text):
            words = shlex.split(line) if program in line else []
            for i, word in enumerate(words):
                if word.endswith(program):
                    found.append(words[i + 1 :])
    return found


def test_every_named_path_exists():
    paths = {p for m in PATH.findall(README) for p in _expand(m)}
    assert len(paths) > 10, "the README should name its configs, notebooks and scripts"
    missing = sorted(p for p in paths if "*" not in p and not (REPO / p).exists())
    assert not missing, f"README names files that do not exist: {missing}"


def test_every_make_target_exists():
    targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), flags=re.M))
    named = {w for text in CODE for w in re.findall(r"\bmake (\w+)", text)}
    assert {"demo", "test"} <= named, "the two commands are make demo and make test"
    assert named <= targets, f"README names make targets the Makefile lacks: {sorted(named - targets)}"


def test_every_notebook_environment_variable_is_read():
    notebooks = "".join(p.read_text() for p in (REPO / "notebooks").glob("*.ipynb"))
    named = set(re.findall(r"\bLIT_DASH_NB_\w+", README))
    assert named and all(v in notebooks for v in named), f"unread variables: {named}"


def test_every_benchmark_flag_exists():
    for args in _commands("python"):
        if args and args[0].startswith("benchmarks/"):
            source = (REPO / args[0]).read_text()
            for flag in (a.split("=")[0] for a in args[1:] if a.startswith("--")):
                assert f'"{flag}"' in source, f"{args[0]} has no option {flag}"


def test_every_class_path_imports():
    paths = set(re.findall(r"\blit_dash(?:\.\w+)+\.[A-Z]\w+", README))
    assert "lit_dash.rewards.examples.FormatBonusModule" in paths
    for path in paths:
        module, name = path.rsplit(".", 1)
        assert hasattr(importlib.import_module(module), name), path


LIT_DASH_COMMANDS = _commands("lit-dash")


def test_the_readme_has_lit_dash_commands():
    assert {args[0] for args in LIT_DASH_COMMANDS} == {"fit", "validate", "test", "predict", "export"}


@pytest.mark.parametrize("args", LIT_DASH_COMMANDS, ids=" ".join)
def test_every_lit_dash_command_parses(args, monkeypatch):
    monkeypatch.chdir(REPO)
    assert args[0] in ("fit", "validate", "test", "predict", "export")
    if args[0] == "export":  # its own parser: the flags it takes
        from lit_dash.export import build_parser

        build_parser().parse_args(args[1:])
        return
    args = args[1:]
    if "--ckpt_path" in args:  # an option of the subcommand, not of the config
        i = args.index("--ckpt_path")
        args = args[:i] + args[i + 2 :]
    build_cli([a for a in args if a != "--print_config"], run=False, instantiate=False)


def _config_keys() -> set[str]:
    """Backticked lit_dash config keys; in the TRL/verl table only the first (lit_dash) column."""
    keys, heading = set(), ""
    for line in README.splitlines():
        heading = line if line.startswith("#") else heading
        if line.startswith("|") and "TRL" in heading:
            line = line.split("|")[1]
        keys.update(re.findall(r"`((?:data|model\.init_args|trainer)\.[\w.*]+)", line))
    return keys


def test_every_config_key_exists(monkeypatch):
    monkeypatch.chdir(REPO)
    config = build_cli(
        ["--config", "configs/paper/qwen05b_math_dash.yaml"], run=False, instantiate=False
    ).config
    keys = _config_keys()
    assert {"data.prompts_per_rollout", "data.group_size", "model.init_args.kl_coef"} <= keys
    missing = []
    for key in keys:
        parts = key.split(".")
        if parts[0] == "data" and parts[1] != "init_args" and "data.init_args" in config:
            parts.insert(1, "init_args")  # `data:` in subclass mode; configs may still omit class_path
        if "*" in parts:  # data.eval_sets.*.path: every eval set
            i = parts.index("*")
            sets = config[".".join(parts[:i])]
            missing += [key for name in sets if not hasattr(sets[name], ".".join(parts[i + 1 :]))]
        elif ".".join(parts) not in config:
            missing.append(key)
    assert not missing, f"README names config keys the code lacks: {missing}"
