"""The documentation: docstrings, the API reference, doctests, and the code on the pages.

* Every public name (`composeopt.__all__`, read at run time) has a docstring
  and a `::: composeopt.Name` line on a page of docs/pages/reference/.
* The examples in the docstrings run as doctests.
* The ```python blocks of the pages and of the README run, in order, one
  namespace per page that starts with `np` and `co` imported.  A block that
  follows "Save this as `name.py`" is saved as that module first.  When each
  `print(...)` of a block sits on its own top-level line with a comment, the
  comment must start with what it prints.  Blocks fenced as ```py are shown,
  not run (they need a GPU, torch, or names defined elsewhere).
* The site's navigation lists every page, and the worked example of "Writing
  your own rule" stays within 20 lines.
"""

from __future__ import annotations

import contextlib
import doctest
import importlib
import io
import pkgutil
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import composeopt as co

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PAGES = DOCS / "pages"
REFERENCE = PAGES / "reference"

PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)
SAVE_AS = re.compile(r"Save this as `(\w+)\.py`:\s*$")
DIRECTIVE = re.compile(r"^:::\s+(composeopt(?:\.\w+)+)\s*$", re.M)


# --------------------------------------------------------------------------
# Docstrings and the API reference
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", co.__all__)
def test_public_name_has_a_docstring(name):
    doc = getattr(co, name).__doc__  # not inspect.getdoc, which would inherit Rule's
    assert doc is not None and len(doc.strip()) >= 20, f"composeopt.{name} needs a docstring"


def reference_targets() -> dict[str, Path]:
    targets = {}
    for page in sorted(REFERENCE.glob("*.md")):
        for target in DIRECTIVE.findall(page.read_text(encoding="utf-8")):
            targets[target] = page
    return targets


@pytest.mark.parametrize("name", co.__all__)
def test_public_name_is_in_the_reference(name):
    assert f"composeopt.{name}" in reference_targets(), (
        f"add '::: composeopt.{name}' to the page of its module in {REFERENCE.relative_to(REPO)}"
    )


OPTIONAL = {"cupy", "cupyx", "numba", "torch"}
"""Libraries that some modules of composeopt import at the top; without them those modules are left out."""


def resolve(path: str) -> Any:
    """The object a mkdocstrings identifier names, importing modules as needed."""
    parts = path.split(".")
    for split in range(len(parts), 0, -1):
        module_name = ".".join(parts[:split])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name in OPTIONAL:
                raise  # the module is there, its library is not
            continue
        for attribute in parts[split:]:
            obj = getattr(obj, attribute)
        return obj
    raise ModuleNotFoundError(path)


def test_every_reference_directive_names_a_real_object():
    targets = reference_targets()
    assert len(targets) >= len(co.__all__)
    for target, page in targets.items():
        try:
            resolve(target)
        except ModuleNotFoundError as err:
            if err.name not in OPTIONAL:
                pytest.fail(f"{page.name}: '::: {target}' names nothing ({err})")
        except (ImportError, AttributeError) as err:
            pytest.fail(f"{page.name}: '::: {target}' names nothing ({err})")


def _importable(module_name: str) -> bool:
    """Backend modules import their compiler or GPU library at the top: without it they are left out."""
    try:
        importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name in OPTIONAL:
            return False
        raise
    return True


MODULES = [
    name
    for name in [
        "composeopt",
        *sorted(info.name for info in pkgutil.walk_packages(co.__path__, "composeopt.")),
    ]
    if _importable(name)
]


def run_doctests(module_name: str) -> doctest.TestResults:
    module = importlib.import_module(module_name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report = io.StringIO()
    for test in doctest.DocTestFinder().find(module, module_name):
        runner.run(test, out=report.write)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, report.getvalue()
    return results


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples_run(module_name):
    run_doctests(module_name)


def test_docstrings_have_examples():
    attempted = sum(run_doctests(name).attempted for name in MODULES)
    assert attempted >= 70  # 84 lines in about 20 docstrings; a count that drops means lost examples


def test_a_wrong_docstring_example_is_caught(monkeypatch):
    from composeopt.rules import sgd

    broken = sgd.Descent.__doc__.replace("[0.9 2.1]", "[0.9 2.2]")
    monkeypatch.setattr(sgd.Descent, "__doc__", broken)
    with pytest.raises(AssertionError, match=r"2\.2"):
        run_doctests("composeopt.rules.sgd")


# --------------------------------------------------------------------------
# Code on the pages
# --------------------------------------------------------------------------


def markdown_files() -> list[Path]:
    return [REPO / "README.md", *sorted(PAGES.rglob("*.md"))]


def python_blocks(text: str) -> list[tuple[str, str | None]]:
    """`(code, module_name)` of each ```python block; `module_name` when the text asks to save it."""
    blocks = []
    for match in PYTHON_BLOCK.finditer(text):
        before = text[: match.start()].rstrip("\n").splitlines()
        save_as = SAVE_AS.search(before[-1]) if before else None
        blocks.append((match.group(1), save_as.group(1) if save_as else None))
    return blocks


def expected_prints(code: str) -> list[str] | None:
    """The comments of a block's top-level `print(...)  # output` lines, if every print has one."""
    lines = code.splitlines()
    commented = [line.split("  # ", 1)[1] for line in lines if line.startswith("print(") and "  # " in line]
    every_print = sum(line.lstrip().startswith("print(") for line in lines)
    return commented if commented and len(commented) == every_print else None


def run_page(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """Run a page's ```python blocks in `tmp_path`; returns how many ran.

    The blocks run there, and their temporary files go there, so that what
    they write never lands in the repository or outlives the test.
    """
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    namespace: dict[str, Any] = {"np": np, "co": co, "__name__": f"page_{page.stem}"}
    blocks = python_blocks(page.read_text(encoding="utf-8"))
    for number, (code, module_name) in enumerate(blocks, start=1):
        where = f"{page.relative_to(REPO)}, python block {number}"
        if module_name is not None:
            (tmp_path / f"{module_name}.py").write_text(code, encoding="utf-8")
            monkeypatch.delitem(sys.modules, module_name, raising=False)
        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            exec(compile(code, where, "exec"), namespace)
        expected = expected_prints(code)
        if expected is not None:
            printed = output.getvalue().splitlines()
            assert len(printed) == len(expected), f"{where}: printed {printed}"
            for got, comment in zip(printed, expected):
                assert comment.startswith(got.rstrip()), (
                    f"{where}: printed {got!r}, the comment says {comment!r}"
                )
    for name, value in list(namespace.items()):
        if name.startswith("test_") and callable(value):
            value()  # a page that shows a test runs it
    return len(blocks)


@pytest.mark.parametrize("page", markdown_files(), ids=lambda path: str(path.relative_to(REPO)))
def test_code_on_the_page_runs(page, tmp_path, monkeypatch):
    run_page(page, tmp_path, monkeypatch)


def test_pages_with_code_have_runnable_blocks(tmp_path, monkeypatch):
    for name in ("index.md", "concepts.md", "writing-rules.md"):
        assert python_blocks((PAGES / name).read_text(encoding="utf-8")), name
    assert python_blocks((REPO / "README.md").read_text(encoding="utf-8"))


def test_a_wrong_printed_value_on_a_page_is_caught(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text("```python\nprint(np.arange(3))  # [0 1 3]\n```\n", encoding="utf-8")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    with pytest.raises(AssertionError, match=r"the comment says '\[0 1 3\]'"):
        run_page(page, tmp_path, monkeypatch)


def test_code_on_a_page_writes_only_in_the_test_directory(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text(
        "```python\nimport tempfile\nopen('relative.txt', 'w').close()\nfolder = tempfile.mkdtemp()\n```\n",
        encoding="utf-8",
    )
    real_repo = REPO
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    run_page(page, tmp_path, monkeypatch)
    assert (tmp_path / "relative.txt").is_file() and not (real_repo / "relative.txt").exists()
    assert [path for path in tmp_path.iterdir() if path.is_dir()]  # mkdtemp's folder


def test_the_worked_rule_fits_in_20_lines():
    code, module_name = python_blocks((PAGES / "writing-rules.md").read_text(encoding="utf-8"))[0]
    assert module_name == "signum" and "class Signum(co.Rule):" in code
    assert len(code.splitlines()) <= 20


# --------------------------------------------------------------------------
# The site's structure
# --------------------------------------------------------------------------


def test_navigation_lists_every_page_and_only_pages_that_exist():
    config = (DOCS / "mkdocs.yml").read_text(encoding="utf-8")
    nav = config[config.index("\nnav:") : config.index("\nmarkdown_extensions:")]
    listed = set(re.findall(r"[\w/-]+\.md", nav))
    present = {str(path.relative_to(PAGES)) for path in PAGES.rglob("*.md")}
    assert listed == present


def test_placeholder_pages_of_other_issues_exist():
    for name in ("schedules.md", "groups.md", "checkpoints.md", "performance.md"):
        assert (PAGES / name).is_file(), name
    assert "make bench" in (PAGES / "performance.md").read_text(encoding="utf-8")


def test_examples_page_includes_every_example_script():
    page = (PAGES / "examples.md").read_text(encoding="utf-8")
    included = set(re.findall(r'--8<-- "(\w+\.py)"', page))
    assert included == {path.name for path in (DOCS / "examples").glob("*.py")}
