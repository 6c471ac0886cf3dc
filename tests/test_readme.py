"""Everything the README and the docs pages (docs/*.md) name exists: files, make targets, notebook
environment variables, lit_dash names and class paths, config keys, lit_dash files named relative to the
package, links and anchors between pages; every `lit-dash` command line parses against the code; the
README stays short, keeps its two commands and links every page; the site's nav and API page are complete.

Each check is a function of one page's text that returns what it found wrong, so the negative controls at
the end feed it a page with one wrong name of each kind and see exactly those reported."""

from __future__ import annotations

import functools
import importlib
import re
import shlex
import textwrap
import unicodedata
from pathlib import Path

import pytest
import yaml
from support import REPO

from lit_dash.cli import build_cli

README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = {str(p.relative_to(REPO)): p.read_text() for p in [README, *DOCS]}
PAGE_IDS = list(PAGES)

PATH = re.compile(r"\b((?:configs|notebooks|benchmarks|scripts|lit_dash|tests|docs)/[\w./{},-]+\w)")
PACKAGE_FILE = re.compile(r"`((?:\w+/)*\w+\.py)`")  # `training/update.py`, `module.py`: under lit_dash/
LINK = re.compile(r"\]\(([^)\s]+)\)")
NAME = re.compile(r"\blit_dash(?:\.\w+)+")
CLASS_PATH = re.compile(r"\blit_dash(?:\.\w+)+\.[A-Z]\w+")
LIT_DASH_SUBCOMMANDS = ("fit", "validate", "test", "predict", "export")


# ----------------------------------------------------------------------------------------- reading a page


def _code(text: str) -> list[str]:
    """Code blocks and inline code."""
    return re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S) + re.findall(r"`([^`\n]+)`", text)


def _expand(path: str) -> list[str]:
    """``a/{b,c}.yaml`` -> ``a/b.yaml``, ``a/c.yaml``."""
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    return [q for part in m.group(1).split(",") for q in _expand(path[: m.start()] + part + path[m.end() :])]


def _lines(text: str) -> list[str]:
    return [line.split("#", 1)[0].strip() for line in text.splitlines()]


def commands(text: str, program: str) -> list[list[str]]:
    """Argument lists after ``program`` in a page's code (code blocks and inline code)."""
    found = []
    for code in _code(text):
        for line in _lines(code):
            words = shlex.split(line) if program in line else []
            for i, word in enumerate(words):
                if word.endswith(program):
                    found.append(words[i + 1 :])
    return found


def named_paths(text: str) -> set[str]:
    return {p for m in PATH.findall(text) for p in _expand(m)}


def _slug(heading: str) -> str:
    """The anchor MkDocs (Python-Markdown's toc) gives a heading."""
    value = unicodedata.normalize("NFKD", heading).encode("ascii", "ignore").decode()
    value = re.sub(r"[^\w\s-]", "", value).strip().lower()
    return re.sub(r"[-\s]+", "-", value)


def anchors(text: str) -> set[str]:
    prose = re.sub(r"```.*?```", "", text, flags=re.S)  # a `# comment` in a code block is no heading
    return {_slug(m) for m in re.findall(r"^#+ (.+?)\s*$", prose, flags=re.M)}


def _config_keys(text: str) -> set[str]:
    """Backticked lit_dash config keys; in a table under a TRL heading only the first (lit_dash) column."""
    keys, heading = set(), ""
    for line in text.splitlines():
        heading = line if line.startswith("#") else heading
        if line.startswith("|") and "TRL" in heading:
            line = line.split("|")[1]
        keys.update(re.findall(r"`((?:data|model\.init_args|trainer)\.[\w.*]+)", line))
    return keys


# ------------------------------------------------------------------------ the checks: what a page gets wrong


def missing_paths(text: str) -> list[str]:
    return sorted(p for p in named_paths(text) if "*" not in p and not (REPO / p).exists())


def missing_package_files(text: str) -> list[str]:
    """`.py` files named relative to lit_dash/ (the parts table's "called by" column, "one training
    step, file by file"): under the repo, under lit_dash/, or (a bare name) somewhere in lit_dash/."""
    package = REPO / "lit_dash"

    def found(name: str) -> bool:
        if (REPO / name).exists() or (package / name).exists():
            return True
        return "/" not in name and any(package.rglob(name))

    return sorted({name for name in PACKAGE_FILE.findall(text) if not found(name)})


def make_targets(text: str) -> set[str]:
    return {w for code in _code(text) for w in re.findall(r"\bmake (\w+)", code)}


def unknown_make_targets(text: str) -> list[str]:
    targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), flags=re.M))
    return sorted(make_targets(text) - targets)


def unread_notebook_variables(text: str) -> list[str]:
    notebooks = "".join(p.read_text() for p in (REPO / "notebooks").glob("*.ipynb"))
    return sorted(v for v in set(re.findall(r"\bLIT_DASH_NB_\w+", text)) if v not in notebooks)


def unknown_benchmark_flags(text: str) -> list[str]:
    bad = []
    for args in commands(text, "python"):
        if args and args[0].startswith("benchmarks/") and (REPO / args[0]).exists():
            source = (REPO / args[0]).read_text()
            flags = (a.split("=")[0] for a in args[1:] if a.startswith("--"))
            bad += [f"{args[0]} {flag}" for flag in flags if f'"{flag}"' not in source]
    return sorted(set(bad))


def _resolves(name: str) -> bool:
    """``lit_dash.a.b.C``: a module, or an attribute path below the longest importable module."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def unresolved_names(text: str) -> list[str]:
    """Dotted lit_dash names (modules, functions, class paths, the API page's ``:::`` lines)."""
    return sorted(n for n in set(NAME.findall(text)) if not _resolves(n))


def broken_links(text: str, page: Path) -> list[str]:
    """Relative links (and their anchors) that lead nowhere; web links are not followed."""
    bad = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            bad.append(target)
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest.read_text())):
            bad.append(target)
    return sorted(bad)


def unrendered_blocks(text: str) -> list[str]:
    """A list or a table straight after a paragraph line: GitHub renders it, MkDocs (Python-Markdown)
    keeps it as the paragraph's text unless a blank line comes first."""
    bad, fence, prev = [], False, ""
    for line in text.splitlines():
        fence ^= line.startswith("```")
        starts = re.match(r"(- |\d+\. |\|)", line)
        if not fence and starts and prev.strip() and not re.match(r"(- |\d+\. |\||\s)", prev):
            bad.append(line)
        prev = line
    return bad


def lit_dash_command_error(args: list[str]) -> None:
    """Parse one `lit-dash` command line as the CLI would (nothing is instantiated or run); raises."""
    assert args and args[0] in LIT_DASH_SUBCOMMANDS, f"not a lit-dash subcommand: {args[:1]}"
    if args[0] == "export":  # its own parser: the flags it takes
        from lit_dash.export import build_parser

        build_parser().parse_args(args[1:])
        return
    args = args[1:]
    if "--ckpt_path" in args:  # an option of the subcommand, not of the config
        i = args.index("--ckpt_path")
        args = args[:i] + args[i + 2 :]
    build_cli([a for a in args if a != "--print_config"], run=False, instantiate=False)


def bad_lit_dash_commands(text: str) -> list[list[str]]:
    bad = []
    for args in commands(text, "lit-dash"):
        try:
            lit_dash_command_error(args)
        except (Exception, SystemExit):
            bad.append(args)
    return bad


@functools.cache
def _paper_config():
    return build_cli(
        ["--config", str(REPO / "configs/paper/qwen05b_math_dash.yaml")], run=False, instantiate=False
    ).config


def unknown_config_keys(text: str) -> list[str]:
    config = _paper_config()
    missing = []
    for key in _config_keys(text):
        parts = key.split(".")
        if parts[0] == "data" and parts[1] != "init_args" and "data.init_args" in config:
            parts.insert(1, "init_args")  # `data:` in subclass mode; configs may still omit class_path
        if "*" in parts:  # data.eval_sets.*.path: every eval set
            i = parts.index("*")
            sets = config[".".join(parts[:i])]
            missing += [key for name in sets if not hasattr(sets[name], ".".join(parts[i + 1 :]))]
        elif ".".join(parts) not in config:
            missing.append(key)
    return sorted(set(missing))


# ---------------------------------------------------------------------------- every page, every check


@pytest.mark.parametrize("page", PAGE_IDS)
def test_every_named_path_exists(page):
    assert not missing_paths(PAGES[page]), (
        f"{page} names files that do not exist: {missing_paths(PAGES[page])}"
    )


def test_the_pages_name_their_files():
    paths = set().union(*(named_paths(t) for t in PAGES.values()))
    assert len(paths) > 10, "the pages should name their configs, notebooks and scripts"
    assert len(named_paths(PAGES["README.md"])) > 10, "the README names its configs, scripts and pages"


@pytest.mark.parametrize("page", PAGE_IDS)
def test_every_package_file_exists(page):
    missing = missing_package_files(PAGES[page])
    assert not missing, f"{page} names lit_dash files that do not exist: {missing}"


def test_the_parts_table_names_package_files():
    named = PACKAGE_FILE.findall(PAGES["docs/how-it-works.md"])
    assert {"training/update.py", "data/buffer.py", "module.py"} <= set(named)


@pytest.mark.parametrize("page", PAGE_IDS)
def test_every_make_target_exists(page):
    assert not unknown_make_targets(PAGES[page]), (
        f"{page} names make targets the Makefile lacks: {unknown_make_targets(PAGES[page])}"
    )


@pytest.mark.parametrize("page", PAGE_IDS)
def test_every_notebook_environment_variable_is_read(page):
    assert not unread_notebook_variables(PAGES[page]), (
        f"unread variables: {unread_notebook_variables(PAGES[page])}"
    )


def test_the_pages_name_notebook_variables():
    assert any(re.search(r"\bLIT_DASH_NB_\w+", t) for t in PAGES.values())


@pytest.mark.parametrize("page", PAGE_IDS)
def test_every_benchmark_flag_exists(page):
    assert not unknown_benchmark_flags(PAGES[page]), f"{page}: {unknown_benchmark_flags(PAGES[page])}"


@pytest.mark.parametrize("page", PAGE_IDS)
def test_every_lit_dash_name_resolves(page):
    assert not unresolved_names(PAGES[page]), (
        f"{page} names what lit_dash lacks: {unresolved_names(PAGES[page])}"
    )


def test_the_pages_name_class_paths():
    paths = set().union(*(CLASS_PATH.findall(t) for t in PAGES.values()))
    assert "lit_dash.rewards.examples.FormatBonusModule" in paths
    assert "lit_dash.rewards.examples.FormatBonusModule" in CLASS_PATH.findall(PAGES["README.md"])


@pytest.mark.parametrize("page", PAGE_IDS)
def test_every_link_leads_somewhere(page):
    bad = broken_links(PAGES[page], REPO / page)
    assert not bad, f"{page} links to missing pages or anchors: {bad}"


@pytest.mark.parametrize("page", PAGE_IDS)
def test_every_list_and_table_renders(page):
    assert not unrendered_blocks(PAGES[page]), f"{page}: a blank line before {unrendered_blocks(PAGES[page])}"


def _all_lit_dash_commands() -> dict[tuple[str, ...], list[str]]:
    """Each distinct command line, with the pages that hold it."""
    found: dict[tuple[str, ...], list[str]] = {}
    for page, text in PAGES.items():
        for args in commands(text, "lit-dash"):
            found.setdefault(tuple(args), []).append(page)
    return found


LIT_DASH_COMMANDS = _all_lit_dash_commands()


def test_the_pages_have_lit_dash_commands():
    assert {args[0] for args in LIT_DASH_COMMANDS} == set(LIT_DASH_SUBCOMMANDS)


@pytest.mark.parametrize("args", list(LIT_DASH_COMMANDS), ids=" ".join)
def test_every_lit_dash_command_parses(args, monkeypatch):
    monkeypatch.chdir(REPO)
    lit_dash_command_error(list(args))


def test_the_knob_pages_name_config_keys():
    assert {"data.prompts_per_rollout", "data.group_size", "model.init_args.kl_coef"} <= _config_keys(
        PAGES["docs/configuration.md"]
    )
    trl = _config_keys(PAGES["docs/coming-from-trl-verl.md"])
    assert {"data.prompts_per_rollout", "model.init_args.tis_cap"} <= trl
    assert "data.train_batch_size" not in trl, "verl's column is not lit_dash's"


@pytest.mark.parametrize("page", PAGE_IDS)
def test_every_config_key_exists(page, monkeypatch):
    monkeypatch.chdir(REPO)
    missing = unknown_config_keys(PAGES[page])
    assert not missing, f"{page} names config keys the code lacks: {missing}"


# --------------------------------------------------------------------------- the README and the site


def test_the_readme_is_short():
    lines = PAGES["README.md"].count("\n")
    assert lines <= 200, f"the README has {lines} lines; move detail into docs/"


def test_the_readme_keeps_the_two_commands():
    block = re.search(r"^## The two commands\n\n```bash\n(.*?)```", PAGES["README.md"], flags=re.S | re.M)
    assert block, "the README's section 'The two commands' with its bash block"
    assert [line.split("#")[0].strip() for line in block.group(1).splitlines()] == ["make demo", "make test"]
    assert {"demo", "test"} <= make_targets(PAGES["README.md"]) - set(
        unknown_make_targets(PAGES["README.md"])
    )


def test_the_readme_links_every_page():
    linked = {(REPO / t.partition("#")[0]).resolve() for t in LINK.findall(PAGES["README.md"])}
    unlinked = [p.name for p in DOCS if p.name != "index.md" and p.resolve() not in linked]
    assert not unlinked, f"the README's 'Where to read next' lacks {unlinked}"


def _nav_pages(nav) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [p for v in nav.values() for p in _nav_pages(v)]
    return [p for item in nav for p in _nav_pages(item)]


def test_the_nav_lists_every_page():
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    nav = _nav_pages(config["nav"])
    assert sorted(nav) == sorted(p.name for p in DOCS), "mkdocs.yml's nav and docs/*.md differ"
    assert (REPO / ".gitignore").read_text().count(f"{config['site_dir'].rstrip('/')}/") == 1


def test_the_api_page_documents_the_module_the_datamodule_and_every_callback():
    import lit_dash.callbacks

    documented = re.findall(r"^::: (lit_dash\.[\w.]+)$", PAGES["docs/api.md"], flags=re.M)
    assert {"lit_dash.module.DashModule", "lit_dash.data.datamodule.RolloutDataModule"} <= set(documented)
    names = {d.rsplit(".", 1)[1] for d in documented if d.startswith("lit_dash.callbacks.")}
    assert set(lit_dash.callbacks.__all__) <= names, sorted(set(lit_dash.callbacks.__all__) - names)


# ---------------------------------------------------------------- negative controls: the checks can fail

BOGUS = textwrap.dedent(
    """\
    # A page with one wrong name of each kind, beside right ones

    See `configs/no_such_recipe.yaml` and `configs/demo.yaml`, [a missing page](no-such-page.md),
    [a missing anchor](configuration.md#no-such-section), [a right one](configuration.md#models-and-data),
    and the parts `training/no_such_part.py` and `training/update.py`. A list straight after a paragraph:
    - no_such_blank_line

    ```bash
    make no_such_target
    make test
    .venv/bin/python benchmarks/dash_vs_grpo.py --no-such-flag 3 --steps 2
    .venv/bin/lit-dash fit --config configs/demo.yaml --data.no_such_knob 3
    .venv/bin/lit-dash fit --config configs/demo.yaml --data.group_size 4
    ```

    `LIT_DASH_NB_NO_SUCH` and `LIT_DASH_NB_STEPS`; `lit_dash.module.NoSuchModule`, `lit_dash.no_such_module`
    and `lit_dash.module.DashModule`; `data.no_such_knob` and `data.group_size`.

    ## Coming from TRL

    | lit_dash | TRL |
    |---|---|
    | `model.init_args.no_such_coef` | `data.only_in_the_other_column` |
    """
)
BOGUS_PAGE = REPO / "docs" / "bogus.md"  # where the page would lie: its links resolve from docs/


def test_negative_control_each_check_reports_the_wrong_name(monkeypatch):
    monkeypatch.chdir(REPO)
    assert missing_paths(BOGUS) == ["configs/no_such_recipe.yaml"]
    assert missing_package_files(BOGUS) == ["training/no_such_part.py"]
    assert unknown_make_targets(BOGUS) == ["no_such_target"]
    assert unread_notebook_variables(BOGUS) == ["LIT_DASH_NB_NO_SUCH"]
    assert unknown_benchmark_flags(BOGUS) == ["benchmarks/dash_vs_grpo.py --no-such-flag"]
    assert unresolved_names(BOGUS) == ["lit_dash.module.NoSuchModule", "lit_dash.no_such_module"]
    assert broken_links(BOGUS, BOGUS_PAGE) == ["configuration.md#no-such-section", "no-such-page.md"]
    assert unknown_config_keys(BOGUS) == ["data.no_such_knob", "model.init_args.no_such_coef"]
    assert unrendered_blocks(BOGUS) == ["- no_such_blank_line"]
    assert bad_lit_dash_commands(BOGUS) == [
        ["fit", "--config", "configs/demo.yaml", "--data.no_such_knob", "3"]
    ]


GOOD = textwrap.dedent(
    """\
    # The same page with the right names only

    See `configs/demo.yaml`, [a right anchor](configuration.md#models-and-data), the part `training/update.py`.
    A list after a blank line:

    - an item

    ```bash
    make test
    .venv/bin/python benchmarks/dash_vs_grpo.py --steps 2
    .venv/bin/lit-dash fit --config configs/demo.yaml --data.group_size 4
    ```

    `LIT_DASH_NB_STEPS`, `lit_dash.module.DashModule` and `data.group_size`.

    ## Coming from TRL

    | lit_dash | TRL |
    |---|---|
    | `model.init_args.kl_coef` | `data.only_in_the_other_column` |
    """
)


def test_negative_control_the_same_page_without_mistakes_reports_nothing(monkeypatch):
    monkeypatch.chdir(REPO)
    checks = (
        missing_paths,
        missing_package_files,
        unknown_make_targets,
        unread_notebook_variables,
        unknown_benchmark_flags,
        unresolved_names,
        unknown_config_keys,
        bad_lit_dash_commands,
        unrendered_blocks,
    )
    assert {check.__name__: check(GOOD) for check in checks} == {check.__name__: [] for check in checks}
    assert broken_links(GOOD, BOGUS_PAGE) == []
