"""Array backends for the tests: every backend test runs on NumPy, on the strict
array-API namespace (which proves the generic code would run on CuPy), and on
CuPy when a GPU is present; missing backends skip cleanly."""

from __future__ import annotations

import functools
import gc
import importlib
import importlib.util
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np
import pytest


def pytest_collection_finish(session: pytest.Session) -> None:
    # Thousands of collected items live until the end of the run: frozen, they are left out of
    # the garbage collector's full passes, which would otherwise walk them all again and again.
    gc.collect()
    gc.freeze()


@dataclass(frozen=True)
class Backend:
    """How to make and read arrays of one array module."""

    name: str
    xp: ModuleType
    dtypes: tuple[str, ...]

    def asarray(self, values: Any, dtype: str = "float64") -> Any:
        host = np.asarray(values, dtype=dtype)
        if self.name == "array_api_strict":
            return self.xp.asarray(host.tolist() if host.ndim else float(host), dtype=getattr(self.xp, dtype))
        return self.xp.asarray(host)

    def copy(self, array: Any) -> Any:
        # Through array_api_compat: NumPy 1.26's own asarray has no copy argument.
        return array_api_compat.array_namespace(array).asarray(array, copy=True)

    def to_numpy(self, array: Any) -> np.ndarray:
        if self.name == "cupy":
            return self.xp.asnumpy(array)
        if self.name == "array_api_strict":
            return np.from_dlpack(array)
        return np.asarray(array)


def _cupy_backend() -> Backend | None:
    try:
        cupy = importlib.import_module("cupy")
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
    except Exception:
        return None
    return Backend("cupy", cupy, ("float16", "float32", "float64"))


def _load(name: str) -> Backend | None:
    if name == "numpy":
        return Backend("numpy", np, ("float16", "float32", "float64"))
    if name == "array_api_strict":
        try:
            strict = importlib.import_module("array_api_strict")
        except ImportError:
            return None
        return Backend("array_api_strict", strict, ("float32", "float64"))  # it has no float16
    return _cupy_backend()


BACKEND_NAMES = ("numpy", "array_api_strict", "cupy")
_cache: dict[str, Backend | None] = {}


def get_backend(name: str) -> Backend:
    if name not in _cache:
        _cache[name] = _load(name)
    backend = _cache[name]
    if backend is None:
        pytest.skip(f"{name} is not available here")
    return backend


@pytest.fixture(params=BACKEND_NAMES)
def backend(request: pytest.FixtureRequest) -> Backend:
    """Each test that takes ``backend`` runs once per installed array module."""
    return get_backend(request.param)


@pytest.fixture
def cupy_backend() -> Backend:
    """CuPy on a GPU, or a skip."""
    return get_backend("cupy")


# --- Several processes under MPI -------------------------------------------------------------

DIST_SCRIPTS = pathlib.Path(__file__).parent / "dist"
"""Scripts that run on every rank of an MPI job (`mpiexec -n N python -m mpi4py script.py`)."""


def _mpiexec() -> str | None:
    """The `mpiexec` of this environment (the mpich wheel puts it beside the interpreter)."""
    beside = pathlib.Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


@functools.cache
def _mpi_missing() -> str | None:
    """Why MPI jobs cannot run here, or `None` if a 2-rank job starts and sees 2 ranks."""
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py is not installed"
    if _mpiexec() is None:
        return "no mpiexec on the PATH"
    try:
        done = _launch(["-c", "from mpi4py import MPI; print(f'<{MPI.COMM_WORLD.Get_size()}>')"], 2, 60)
    except subprocess.TimeoutExpired:
        return "a 2-rank MPI job did not start within 60 s"
    sizes = re.findall(r"<(\d+)>", done.stdout)  # the ranks' lines may reach the pipe interleaved
    if done.returncode != 0 or sizes != ["2", "2"]:
        # A launcher from one MPI and a library from another start N singletons of size 1.
        return f"mpiexec -n 2 does not start one job of 2 ranks (printed {sizes}, rc {done.returncode})"
    return None


def _launch(arguments: list[str], ranks: int, timeout: float, env: dict[str, str] | None = None) -> Any:
    """`mpiexec -n ranks python ...`, in a process group of its own, killed whole at `timeout`."""
    environment = {**os.environ, **(env or {})}
    # mpiexec's own limit, a little before ours, so that it can tear the job down itself.
    environment["MPIEXEC_TIMEOUT"] = str(max(1, int(timeout) - 5))
    environment["COMPOSEOPT_TEST_RANKS"] = str(ranks)
    command = [_mpiexec() or "mpiexec", "-n", str(ranks), sys.executable, *arguments]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.fixture
def mpirun() -> Callable[..., Any]:
    """`mpirun(script, ranks, *args, timeout=120, env=None, check=True)` runs `tests/dist/script`
    (or `script` itself, given as a `pathlib.Path`) on `ranks` MPI processes as `python -m mpi4py` (an exception on any rank aborts the whole
    job) and returns the finished process; skips when MPI cannot start here.  A job that runs
    past `timeout` is killed, with every process it started, and fails the test."""
    missing = _mpi_missing()
    if missing is not None:
        pytest.skip(missing)

    def run(
        script: str | pathlib.Path,
        ranks: int,
        *args: str,
        timeout: float = 120,
        env: dict[str, str] | None = None,
        check: bool = True,
    ) -> Any:
        path = script if isinstance(script, pathlib.Path) else DIST_SCRIPTS / script
        try:
            done = _launch(["-m", "mpi4py", str(path), *args], ranks, timeout, env)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{script} on {ranks} ranks ran past {timeout} s and was killed")
        if check and done.returncode != 0:
            pytest.fail(f"{script} on {ranks} ranks exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        return done

    return run
