"""Generated kernel modules: named by their source and by the numba helpers compiled into them."""

import sys

from composeopt._fused import cache

SOURCE = "def answer():\n    return 42\n"


def test_a_helper_changed_changes_the_digest(tmp_path):
    (tmp_path / "_numba_norms.py").write_text("def power(): return 1\n")
    (tmp_path / "unrelated.py").write_text("x = 1\n")
    before = cache.helpers_digest.__wrapped__(tmp_path)
    (tmp_path / "unrelated.py").write_text("x = 2\n")
    assert cache.helpers_digest.__wrapped__(tmp_path) == before
    (tmp_path / "_numba_norms.py").write_text("def power(): return 2\n")
    assert cache.helpers_digest.__wrapped__(tmp_path) != before


def test_the_package_helpers_are_in_the_digest():
    assert cache.helpers_digest() != cache.helpers_digest.__wrapped__(cache.Path("/nonexistent"))


def test_a_module_is_named_by_its_source_and_by_the_helpers(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPOSEOPT_CACHE_DIR", str(tmp_path))
    first = cache.load_module(SOURCE, "composeopt_test")
    assert cache.load_module(SOURCE, "composeopt_test") is first
    assert first.answer() == 42
    # The same generated source, compiled against other helpers, must not find the old file.
    monkeypatch.setattr(cache, "helpers_digest", lambda: b"other helpers")
    second = cache.load_module(SOURCE, "composeopt_test")
    assert second.__name__ != first.__name__
    assert sorted(path.name for path in tmp_path.glob("composeopt_test_*.py")) == sorted(
        [f"{first.__name__}.py", f"{second.__name__}.py"]
    )
    for module in (first, second):
        sys.modules.pop(module.__name__, None)
