"""Every built-in rule is on the two human-readable pages that list rules.

* docs/pages/rules.md has a `### Name` section for each rule: its formula and
  the settings that reproduce its peers.
* docs/pages/migration.md names each rule as a call, `Name(...)`, in a
  "composeopt" column of its tables: some peer optimiser maps to it (or it is
  the closest setting of one).

The rules are `composeopt.registry.RULES` plus the `SGD` factory, read at run
time, so a rule added to the registry fails here until both pages have it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from composeopt.registry import RULES

PAGES = Path(__file__).resolve().parents[1] / "docs" / "pages"
RULE_NAMES = sorted([*RULES, "SGD"])
LIBRARIES = ("Optimisers.jl", "torch.optim", "optax", "brainpy.optim", "braintools.optim", "mindspore.nn")


def rule_sections(text: str) -> set[str]:
    """The titles of the page's `### Title` sections."""
    return set(re.findall(r"^### (\S+)\s*$", text, re.M))


def composeopt_cells(text: str) -> list[str]:
    """The cells of every table column whose header names composeopt."""
    cells: list[str] = []
    column = None
    for line in text.splitlines():
        if not line.startswith("|"):
            column = None  # a table ends at its first line that is not a row
            continue
        row = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if column is None:  # the header row of a new table
            column = next((i for i, cell in enumerate(row) if "composeopt" in cell), -1)
        elif column >= 0 and column < len(row) and not set(row[column]) <= set("-: "):
            cells.append(row[column])
    return cells


def unmapped(names: list[str], text: str) -> list[str]:
    """The names that no composeopt cell of `text` calls as `Name(` or `co.Name(`."""
    joined = "\n".join(composeopt_cells(text))
    return [name for name in names if not re.search(rf"(?<![\w.])(?:co\.)?{name}\(", joined)]


@pytest.fixture(scope="module")
def migration() -> str:
    return (PAGES / "migration.md").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def rules_page() -> str:
    return (PAGES / "rules.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("name", RULE_NAMES)
def test_rule_has_a_section_on_the_rules_page(name, rules_page):
    assert name in rule_sections(rules_page), f"add a '### {name}' section to docs/pages/rules.md"


@pytest.mark.parametrize("name", RULE_NAMES)
def test_rule_is_mapped_in_the_migration_tables(name, migration):
    assert not unmapped([name], migration), (
        f"docs/pages/migration.md: no table maps a peer optimiser to {name}(...) in its composeopt column"
    )


def test_the_migration_page_has_a_table_per_library(migration):
    # The parser must see the tables: one (or more) per library, each with a composeopt column.
    for library in LIBRARIES:
        assert re.search(rf"^\| {re.escape(library)}\b.*composeopt", migration, re.M), library
    assert len(composeopt_cells(migration)) > 200


def test_a_missing_rule_is_caught(migration, rules_page):
    # Only the peers' column still names Lamb: the check must not count it.
    without = re.sub(r"(?<![\w.])(co\.)?Lamb\(", "Lion(", migration)
    without = without.replace("| `lamb(", "| `Lamb(")  # a peer cell that looks like the rule
    assert unmapped(["Lamb", "Lars"], without) == ["Lamb"]
    assert "Lamb" not in rule_sections(rules_page.replace("### Lamb", "### Lamb (gone)"))
    peer_only = "| torch.optim | composeopt |\n| --- | --- |\n| `SGD(lr=η)` | `Descent(η)` |\n"
    assert unmapped(["SGD", "Descent"], peer_only) == ["SGD"]
