"""What type checkers see: mypy --strict over user code, with the project's configuration.

* tests/typing_snippets/good.py is user code in the styles of the README and the
  pages (constructors positional and by name, schedules, chains indexed,
  rules of one's own, steps): mypy reports nothing, and it runs.
* In tests/typing_snippets/bad.py, the line after each `# error: TEXT` comment
  gets a mypy error containing TEXT and raises when run; the line after
  `# type error: TEXT` gets the error only.  No other line gets one.

mypy runs once over both files, from the repository root so that it reads the
composeopt beside the tests.  Its cache is a temporary copy of the project's
own (`.mypy_cache`, left by `mypy` at the root) when there is one, else cold.
"""

from __future__ import annotations

import re
import runpy
import shutil
from pathlib import Path

import pytest

mypy_api = pytest.importorskip("mypy.api")

REPO = Path(__file__).resolve().parents[1]
SNIPPETS = Path(__file__).resolve().parent / "typing_snippets"
GOOD, BAD = SNIPPETS / "good.py", SNIPPETS / "bad.py"
MARK = re.compile(r"^# (type )?error: (.*)$")
ERROR = re.compile(r"^(?P<path>.+?):(?P<line>\d+): error: (?P<message>.*)$")


def marked_lines() -> list[tuple[int, str, str, bool]]:
    """`(number, code, expected text, raises at run time)` for each marked line of bad.py."""
    lines = BAD.read_text(encoding="utf-8").splitlines()
    marked = []
    for number, line in enumerate(lines[:-1], start=2):
        match = MARK.match(line)
        if match:
            marked.append((number, lines[number - 1], match.group(2), match.group(1) is None))
    return marked


MARKED = marked_lines()


@pytest.fixture(scope="module")
def mypy_errors(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], list[str]]:
    """mypy's errors, by file name and line."""
    cache = tmp_path_factory.mktemp("mypy") / "cache"
    if (REPO / ".mypy_cache").is_dir():
        shutil.copytree(REPO / ".mypy_cache", cache)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        stdout, stderr, status = mypy_api.run(
            [
                "--config-file",
                str(REPO / "pyproject.toml"),
                "--strict",
                "--cache-dir",
                str(cache),
                "--no-pretty",
                "--no-error-summary",
                str(GOOD.relative_to(REPO)),
                str(BAD.relative_to(REPO)),
            ]
        )
    assert status in (0, 1), f"mypy failed to run:\n{stdout}{stderr}"
    errors: dict[tuple[str, int], list[str]] = {}
    for line in stdout.splitlines():
        match = ERROR.match(line)
        if match:
            errors.setdefault((Path(match["path"]).name, int(match["line"])), []).append(match["message"])
        elif ": note: " not in line:
            raise AssertionError(f"unexpected mypy output: {line}")
    return errors


def test_mypy_accepts_the_ways_the_docs_use_composeopt(mypy_errors):
    found = {key: messages for key, messages in mypy_errors.items() if key[0] == GOOD.name}
    assert not found, "\n".join(
        f"good.py:{line}: {messages}" for (_, line), messages in sorted(found.items())
    )


def test_the_accepted_code_runs():
    runpy.run_path(str(GOOD), run_name="typing_snippets_good")


@pytest.mark.parametrize(
    ("number", "code", "expected", "raises"), MARKED, ids=[code for _, code, _, _ in MARKED]
)
def test_mypy_refuses_the_mistake_with_its_message(mypy_errors, number, code, expected, raises):
    messages = mypy_errors.get((BAD.name, number), [])
    assert any(expected in message for message in messages), f"bad.py:{number}: {code}\nmypy said: {messages}"


def test_mypy_refuses_nothing_else(mypy_errors):
    marked = {number for number, *_ in MARKED}
    extra = {line: messages for (name, line), messages in mypy_errors.items() if name == BAD.name}
    assert set(extra) <= marked, {line: extra[line] for line in set(extra) - marked}


@pytest.mark.parametrize(
    ("number", "code"),
    [(n, c) for n, c, _, raises in MARKED if raises],
    ids=[c for _, c, _, r in MARKED if r],
)
def test_what_mypy_refuses_also_fails_at_run_time(number, code):
    refused = {n for n, *_ in MARKED}
    lines = BAD.read_text(encoding="utf-8").splitlines()
    unmarked = "\n".join("" if n in refused else line for n, line in enumerate(lines, start=1))
    namespace: dict[str, object] = {"__name__": "typing_snippets_bad"}
    exec(compile(unmarked, str(BAD), "exec"), namespace)
    with pytest.raises((TypeError, ValueError, AttributeError)):
        exec(compile("\n" * (number - 1) + code, str(BAD), "exec"), namespace)
