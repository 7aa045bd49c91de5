"""User code that type checkers must refuse.

The line after each `# error: TEXT` comment must get a mypy error containing
TEXT and must raise when it runs; the line after `# type error: TEXT` must get
the error but runs (its value is fine, the type it is given to is not).  No
other line may get an error (tests/test_typing.py).
"""

from __future__ import annotations

import composeopt as co
from composeopt.hyper import nonnegative

# error: Unexpected keyword argument "lr" for "Adam"
co.Adam(lr=1e-3)
# error: Argument 1 to "Adam" has incompatible type "str"; expected "float | Callable[[int], float]"
co.Adam("fast")
# error: Too many arguments for "Adam"
co.Adam(1e-3, (0.9, 0.999), 1e-8, 0.1)
# error: Argument "rho" to "Momentum" has incompatible type "str"
co.Momentum(rho="x")
# error: Argument "eta" to "Adam" has incompatible type "Callable[[], float]"
co.Adam(eta=lambda: 1e-3)
# error: Argument "beta" to "Adam" has incompatible type "float"
co.Adam(beta=0.9)
# error: Missing positional argument "omega" in call to "ClipGlobalNorm"
co.ClipGlobalNorm()
# error: Unexpected keyword argument "sync_period" for "Lookahead"
co.Lookahead(co.Adam(), sync_period=5)
# error: Missing positional argument "inner" in call to "Lookahead"
co.Lookahead(k=5)
# error: Argument 2 to "Optimiser" has incompatible type "str"; expected "Rule"
co.Optimiser(co.Adam(), "Descent")

adam = co.Adam()
# error: Incompatible types in assignment (expression has type "str"
adam.eta = "fast"
# error: "Adam" has no attribute "lr"
adam.lr = 1e-3
# type error: Incompatible types in assignment (expression has type "float", variable has type "str")
name: str = adam.eta


class Signum(co.Rule):
    eta: co.Hyper[float] = co.Hyper(default=0.01, check=nonnegative)


# error: Too many arguments for "Signum"
Signum(0.1, 0.5)
# error: Unexpected keyword argument "lr" for "Signum"
Signum(lr=0.1)
