"""The package as released: what `import composeopt` loads, its version, its licence and its sdist.

The tests that read the source tree (LICENSE, CHANGELOG.md, building the
sdist) skip where only the tests and the docs were copied beside an
installed package.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import composeopt as co

REPO = Path(__file__).resolve().parents[1]
SOURCE_TREE = (REPO / "composeopt" / "__init__.py").is_file()
needs_source_tree = pytest.mark.skipif(not SOURCE_TREE, reason="needs the source tree, not an installed copy")


def test_import_composeopt_loads_neither_the_demo_nor_the_benchmark():
    # A fresh interpreter, so that what other tests imported does not count.
    script = (
        "import json, sys, composeopt\n"
        "print(json.dumps({'file': composeopt.__file__, 'modules': sorted(sys.modules)}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    loaded = json.loads(done.stdout)
    assert loaded["file"] == co.__file__  # the same package as the tests see
    unwanted = [
        name
        for name in loaded["modules"]
        if name.split(".")[0] in {"matplotlib", "tqdm"}
        or name.startswith(("composeopt.demo", "composeopt.bench"))
    ]
    assert unwanted == []


def test_the_version_is_written_once_and_the_metadata_reads_it():
    assert re.fullmatch(r"\d+\.\d+\.\d+", co.__version__)
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert "version" not in project["project"] and project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "composeopt.__version__"}


def test_the_installed_metadata_has_the_package_version():
    try:
        installed = importlib.metadata.version("composeopt")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("composeopt is imported from a tree that was never installed")
    assert installed == co.__version__


def test_the_metadata_states_the_licence_and_python_versions():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    classifiers = project["classifiers"]
    assert not [c for c in classifiers if c.startswith("License ::")]  # PEP 639: the expression says it
    minimum = re.fullmatch(r">=3\.(\d+)", project["requires-python"])
    assert minimum is not None
    versions = sorted(int(c.rsplit(".", 1)[1]) for c in classifiers if re.fullmatch(r".*Python :: 3\.\d+", c))
    assert versions[0] == int(minimum.group(1)) and versions == list(range(versions[0], versions[-1] + 1))
    assert "Typing :: Typed" in classifiers and (Path(co.__file__).parent / "py.typed").is_file()


@needs_source_tree
def test_the_licence_is_mit_and_the_changelog_opens_with_this_version():
    licence = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert licence.startswith("MIT License\n\nCopyright (c) 2026 the composeopt developers\n")
    assert "Permission is hereby granted, free of charge" in licence
    changelog = (REPO / "CHANGELOG.md").read_text(encoding="utf-8")
    releases = re.findall(r"^## (\S+)", changelog, re.M)
    assert releases[0] == co.__version__


def _copy_of_the_source_tree(target: Path) -> Path:
    """The files an sdist is built from, without what builds and test runs leave behind."""
    # Not "dist": composeopt/dist and tests/dist are sources (the top-level dist/ is not copied).
    ignore = shutil.ignore_patterns("__pycache__", "*.py[cod]", "*.egg-info", "build", "site")
    for folder in ("composeopt", "tests", "docs", ".ci"):
        shutil.copytree(REPO / folder, target / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md", "MANIFEST.in", "Makefile"):
        shutil.copy2(REPO / name, target / name)
    return target


def _build(kind: str, tree: Path, out: Path) -> Path:
    """Build an sdist or a wheel of `tree` into `out` with setuptools' PEP 517 hooks; its path."""
    hook = f"import sys\nfrom setuptools import build_meta\nprint(build_meta.build_{kind}(sys.argv[1]))\n"
    done = subprocess.run(
        [sys.executable, "-c", hook, str(out)], cwd=tree, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    return out / done.stdout.split()[-1]  # setuptools logs to stdout first


def _setuptools_version() -> tuple[int, ...]:
    try:
        version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        return (0,)
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


@needs_source_tree
@pytest.mark.skipif(_setuptools_version() < (77,), reason="the build needs setuptools 77 (SPDX licences)")
def test_the_sdist_carries_the_tests_and_the_docs_they_read(tmp_path):
    tree = _copy_of_the_source_tree(tmp_path / "tree")
    sdist = _build("sdist", tree, tmp_path / "dist")
    root = f"composeopt-{co.__version__}"
    assert sdist.name == f"{root}.tar.gz"
    with tarfile.open(sdist) as archive:
        members = {name.removeprefix(f"{root}/") for name in archive.getnames()}
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python 3.10.12 and later
        archive.extractall(tmp_path / "unpacked", **safe)
    expected = {
        str(path.relative_to(tree))
        for folder in ("tests", "docs", "composeopt")
        for path in (tree / folder).rglob("*")
        if path.is_file()
    }
    assert expected - members == set()
    assert {"LICENSE", "CHANGELOG.md", "README.md", "pyproject.toml", "Makefile", ".ci/run"} <= members

    # The wheel built from the sdist, as pip would build it.
    wheel = _build("wheel", tmp_path / "unpacked" / root, tmp_path / "wheel")
    assert wheel.name == f"{root}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        files = set(archive.namelist())
    assert {
        "composeopt/py.typed",
        "composeopt/demo/cli.py",
        "composeopt/bench/__main__.py",
        "composeopt/dist/comm.py",
    } <= files
    assert f"{root}.dist-info/licenses/LICENSE" in files
    assert not [name for name in files if name.startswith(("tests/", "docs/"))]
