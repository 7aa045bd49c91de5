"""`python -m composeopt.bench`: see `composeopt.bench`."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    main()
