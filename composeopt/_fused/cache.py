"""Where generated kernel sources live, so that numba's `cache=True` finds them again.

numba caches a compiled function next to its source file, keyed by the file's
path and time stamp; a function made with `exec` cannot be cached.  So each
generated module is written once to a file named after the hash of its
source, and imported from there: the next process finds both the file and
numba's compiled code, and does not compile again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
from pathlib import Path
from types import ModuleType

__all__ = ["load_module"]

# A module is in sys.modules before its code has run: two threads' first steps (ranks of a
# job run as threads, or two optimisers) must not see it half made.
_loading = threading.Lock()


def _directory() -> Path | None:
    """`COMPOSEOPT_CACHE_DIR`, else the user's cache folder, else the temporary folder."""
    candidates = []
    if os.environ.get("COMPOSEOPT_CACHE_DIR"):
        candidates.append(Path(os.environ["COMPOSEOPT_CACHE_DIR"]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    candidates.append(Path(base) / "composeopt" / "kernels")
    candidates.append(
        Path(tempfile.gettempdir()) / f"composeopt-kernels-{os.getuid() if hasattr(os, 'getuid') else 0}"
    )
    for directory in candidates:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(directory, os.W_OK):
            return directory
    return None


def load_module(source: str, prefix: str) -> ModuleType:
    """Import `source` as a module backed by a file (without one, numba's cache is turned off)."""
    name = f"{prefix}_{hashlib.sha256(source.encode()).hexdigest()[:24]}"
    with _loading:
        if name in sys.modules:
            return sys.modules[name]
        return _load(source, name)


def _load(source: str, name: str) -> ModuleType:
    directory = _directory()
    path = None if directory is None else directory / f"{name}.py"
    if path is not None and not path.exists():
        try:
            handle, temporary = tempfile.mkstemp(dir=directory, suffix=".tmp")
            with os.fdopen(handle, "w") as file:
                file.write(source)
            os.replace(temporary, path)
        except OSError:
            path = None
    module = ModuleType(name)
    if path is None:
        exec(compile(source.replace("cache=True", "cache=False"), f"<{name}>", "exec"), module.__dict__)
    else:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    sys.modules[name] = module
    return module
