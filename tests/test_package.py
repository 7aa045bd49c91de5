"""The package as installed: typed (PEP 561), with its command line."""

from __future__ import annotations

import importlib.resources

import composeopt as co


def test_the_package_declares_its_types():
    assert importlib.resources.files("composeopt").joinpath("py.typed").is_file()


def test_public_names_exist_and_are_unique():
    assert len(co.__all__) == len(set(co.__all__))
    for name in co.__all__:
        assert hasattr(co, name), name
