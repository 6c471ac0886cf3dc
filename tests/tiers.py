"""The suite's tiers, decided from what each test uses; ``conftest.py`` marks every test at collection.

* ``engine``: the test asks (directly or through another fixture) for a session vLLM engine.
* ``slow``: the test, or a helper of the test modules it calls (followed through their code), runs a
  training fit (``fit``: Trainer.fit or tests/fitting.py's), the CLI's fit (``build_cli`` in code that
  names ``"fit"``), a subprocess (a CLI
  run, DDP ranks, a notebook, a benchmark, reward worker processes), or uses the real 135M model.

``make test-fast`` runs what is not ``slow``: the unit tests and the cheap engine tests (one tiny engine
started once). ``make test`` runs everything. A marker written by hand adds to these, never removes.
"""

from __future__ import annotations

import inspect
import types

ENGINE_FIXTURES = frozenset(
    {"tiny_engine", "tiny_engine_bf16", "tiny_engine_prefix_cached", "smollm2_engine"}
)
REAL_MODEL_FIXTURES = frozenset({"smollm2_engine", "smollm2_path"})
# names whose use makes a test slow: what they start costs seconds to minutes
SLOW_NAMES = frozenset({"fit", "subprocess", "Popen", "run_logged", "ProcessPoolExecutor", "nbclient"})
# ... and the CLI when the same code names its fit subcommand (parsing a config alone takes a second)
CLI, CLI_FIT = "build_cli", "fit"


def _code_objects(code: types.CodeType):
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_objects(const)


def _constants(code: types.CodeType) -> set:
    """The code's constants, tuples of constants (a list literal of them compiles to one) opened."""
    out, todo = set(), list(code.co_consts)
    while todo:
        const = todo.pop()
        if isinstance(const, tuple | frozenset):
            todo += list(const)
        elif isinstance(const, str):
            out.add(const)
    return out


def slow_names(function, _seen: set | None = None) -> set[str]:
    """The ``SLOW_NAMES`` a test function uses, itself or through the functions and classes of test
    modules it names (followed once each)."""
    seen = set() if _seen is None else _seen
    target = inspect.unwrap(function)
    code = getattr(target, "__code__", None)
    if code is None or target in seen:
        return set()
    seen.add(target)
    found: set[str] = set()
    module_globals = getattr(target, "__globals__", {})
    for sub in _code_objects(code):
        if CLI in sub.co_names and CLI_FIT in _constants(sub):
            found.add(CLI)
        for name in sub.co_names:
            if name in SLOW_NAMES:
                found.add(name)
            value = module_globals.get(name)
            for helper in _helpers(value):
                found |= slow_names(helper, seen)
    return found


def _helpers(value) -> list:
    """The functions a name leads to, when it is defined in a test module (tests/, not lit_dash)."""
    module = getattr(value, "__module__", "") or ""
    if module.startswith(("lit_dash", "builtins", "torch", "lightning", "pytest", "_pytest", "transformers")):
        return []
    if inspect.isfunction(value):
        return [value]
    if inspect.isclass(value) and value.__module__ not in ("builtins",):
        return [m for m in vars(value).values() if inspect.isfunction(m)]
    return []


def tiers_of(item) -> set[str]:
    """The tiers (``engine``, ``slow``) of one collected pytest item."""
    fixtures = set(getattr(item, "fixturenames", ()))
    tiers = set()
    if fixtures & ENGINE_FIXTURES:
        tiers.add("engine")
    function = getattr(item, "function", None)
    fixture_functions = []
    manager = getattr(getattr(item, "session", None), "_fixturemanager", None)
    if manager is not None:
        for name in fixtures:
            for definition in manager.getfixturedefs(name, item) or ():
                fixture_functions.append(definition.func)
    uses = set()
    for f in [function, *fixture_functions]:
        if f is not None:
            uses |= slow_names(f)
    if uses or fixtures & REAL_MODEL_FIXTURES:
        tiers.add("slow")
    return tiers
