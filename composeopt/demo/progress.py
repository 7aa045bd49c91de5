"""The demo's progress bar: tqdm on standard error, when that is a terminal."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["progress_bar"]


@contextmanager
def progress_bar(total: int, description: str, enabled: bool) -> Iterator[Callable[[int], object] | None]:
    """A tqdm progress bar on standard error, as the function that advances it.

    `None` when disabled, when standard error is not a terminal (a bar redrawn
    with carriage returns only litters a log or a pipe), or when tqdm is not
    installed.
    """
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    try:
        tqdm = importlib.import_module("tqdm").tqdm
    except ImportError:
        yield None
        return
    with tqdm(total=total, desc=description, unit="step", leave=False, file=sys.stderr) as bar:
        yield bar.update
