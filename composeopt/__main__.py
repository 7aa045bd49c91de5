"""`python -m composeopt [demo]`: the command line, defined in `composeopt.demo.cli`."""

from __future__ import annotations

from .demo.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
