"""Where generated kernel sources live, so that numba's `cache=True` finds them again.

numba caches a compiled function next to its source file, keyed by the file's
path and time stamp; a function made with `exec` cannot be cached.  So each
generated module is written once to a file named after the hash of its
source, and imported from there: the next process finds both the file and
numba's compiled code, and does not compile again.

Generated code calls the numba helpers of this package (`_numba_*.py`), and
numba compiles them into it; its cache checks only the generated file's own
time stamp.  So the hash covers those helpers' sources too: a release that
changes a helper gets new files, never a kernel compiled with the old one.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
from pathlib import Path
from types import ModuleType

__all__ = ["helpers_digest", "load_module"]

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


@functools.cache
def helpers_digest(folder: Path = Path(__file__).parent) -> bytes:
    """The digest of the numba helpers (`folder`'s `_numba_*.py`) that generated code imports."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("_numba_*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.digest()


def load_module(source: str, prefix: str) -> ModuleType:
    """Import `source` as a module backed by a file (without one, numba's cache is turned off)."""
    name = f"{prefix}_{hashlib.sha256(helpers_digest() + source.encode()).hexdigest()[:24]}"
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
