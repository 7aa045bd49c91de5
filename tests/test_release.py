"""The package as released: what `import composeopt` loads, its version, its licence and its sdist."""

from __future__ import annotations

import json
import subprocess
import sys

import composeopt as co


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
