"""User code that type checkers must accept: the README's and the pages' ways of using composeopt.

tests/test_typing.py runs mypy --strict over this file (it must report nothing) and runs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

import composeopt as co
from composeopt.hyper import HyperTuple, Scheduled, beta_pair, nonnegative, unit_interval

if TYPE_CHECKING:
    from typing_extensions import assert_type

# Constructors: positionally in declaration order, or by name, with numbers or schedules.
adam = co.Adam(1e-3)
adam = co.Adam(eta=1e-3)
adam = co.Adam(1e-3, (0.9, 0.99), 1e-8)
adam = co.Adam(eta=co.Warmup(co.CosineAnnealing(1e-3, 900), 100))
adam = co.Adam(eta=lambda step: 1e-3 / step**0.5)
adam = co.Adam(eta=co.Warmup(co.CosineAnnealing(1e-3, 900), 100), beta=(co.Linear(0.85, 0.95, 300), 0.999))
adam = co.ADAM(1e-3)
opt = co.Optimiser(co.ClipNorm(1.0), co.WeightDecay(1e-4), co.Adam(1e-3))
chain = co.OptimiserChain(co.ClipGlobalNorm(1.0), co.Momentum(0.01, rho=0.9), co.AdamW(lambda_=1e-2))
scheduled = co.Optimiser(
    co.ClipNorm(omega=co.Linear(10.0, 1.0, 100)),
    co.WeightDecay(co.Step(1e-4, 500, 0.5)),
    co.Adam(eta=co.Warmup(co.CosineAnnealing(1e-3, 900), 100), beta=(co.Linear(0.85, 0.95, 300), 0.999)),
)
others = [
    co.Descent(0.1),
    co.Nesterov(0.01, 0.9),
    co.RMSProp(1e-3, centred=True),
    co.Adan(beta=(0.98, 0.92, 0.99)),
    co.Lion(1e-4, (0.9, 0.99)),
    co.Rprop(1e-3, (0.5, 1.2), (1e-6, 50.0)),
    co.AccumGrad(4),
    co.ExpDecay(0.1, 0.5, 1000, 1e-4),
    co.Lookahead(co.Adam(), k=5, alpha=0.5),
    co.Lookahead(co.Optimiser(co.ClipNorm(1.0), co.Adam()), 5),
    co.MixedPrecision(co.Adam(1e-3), "float32"),
    co.SkipNonFinite(co.Adam(), max_consecutive=10),
    co.Muon(0.02, rho=0.95, fallback=co.AdamW(3e-4)),
    co.LBFGS(eta=0.5, memory=10),
    co.SGD(0.1, momentum=0.9),
]

# Hyperparameters read as numbers and take numbers or schedules, on a rule or inside a chain.
opt[2].eta = 1e-4
opt[2].eta = co.CosineAnnealing(1e-3, 900)
names = [type(rule).__name__ for rule in opt if rule.fallible is False]
adam.eta = 3e-4
adam.beta = (0.9, 0.95)
adam.beta = (co.Linear(0.85, 0.95, 300), 0.999)
learning_rate: float = adam.eta
b1, b2 = adam.beta
log = {"eta": adam.eta * 2, "b1": b1 + b2}
co.adjust_(opt, 1e-4)
co.adjust_(opt, eta=0.005, lambda_=0.0)
if TYPE_CHECKING:
    assert_type(adam.eta, float)
    assert_type(adam.beta, "tuple[float, float]")
    assert_type(co.Momentum().rho, float)
    assert_type(co.ClipNorm().throw, bool)
    assert_type(co.AccumGrad().n, int)


# A rule of one's own, typed: its constructor is checked like the built-in ones.
class Signum(co.Rule):
    """Sign descent with momentum."""

    fallible = False
    eta: co.Hyper[float] = co.Hyper(default=0.01, check=nonnegative)
    beta: co.Hyper[float] = co.Hyper(default=0.9, check=unit_interval)

    def init(self, x: Any) -> co.State:
        return co.State(m=co.namespace(x).zeros_like(x))

    def apply_(self, state: Any, x: Any, dx: Any) -> Any:
        state.m = self.beta * state.m + (1 - self.beta) * dx
        return self.eta * co.namespace(x).sign(state.m)


class Paired(co.Rule):
    """A required hyperparameter, and a pair whose items may follow schedules."""

    scale: co.Hyper[float] = co.Hyper(check=nonnegative)
    beta: HyperTuple[tuple[float, float]] = HyperTuple(default=(0.9, 0.99), check=beta_pair)


class Halve(co.Rule):
    """The pages' shortest form: no annotations, so the constructor is not checked."""

    scale = co.Hyper(0.5, nonnegative)

    def apply_(self, state: Any, x: Any, dx: Any) -> Any:
        return self.scale * dx


class Scaled(co.Rule):
    """A rule with a constructor of its own keeps it."""

    factor: co.Hyper[float] = co.Hyper(default=1.0)

    def __init__(self, inner: co.Rule, factor: Scheduled[float] = 1.0) -> None:
        self.inner = inner
        super().__init__(factor)

    def apply_(self, state: Any, x: Any, dx: Any) -> Any:
        return self.factor * self.inner.apply_(state, x, dx)


signum = Signum(0.1, beta=0.5)
signum = Signum(eta=co.Linear(0.1, 0.01, 100))
signum.eta = 0.05
paired = Paired(2.0, beta=(co.Linear(0.5, 0.9, 10), 0.99))
halved = Halve(0.25)
scaled = Scaled(co.Descent(0.1), 2.0)
custom = co.Optimiser(co.ClipNorm(1.0), Signum(0.01, beta=0.95), scaled)
custom[1].eta = 0.005
if TYPE_CHECKING:
    assert_type(signum.eta, float)
    assert_type(paired.beta, "tuple[float, float]")

# Steps.
params = {"W": np.random.randn(3, 3), "b": np.zeros(3)}
grads = {"W": np.ones((3, 3)), "b": np.ones(3)}
for _ in range(3):
    co.update_(opt, params, grads)
    co.update_(custom, params, grads)
    co.update_(signum, params, grads)
new_params = co.update(co.Adam(1e-3), params, grads)
x = np.ones(3)
co.update_(co.Descent(0.1), x, np.ones(3))
assert co.hyperparameters(opt)["[2].eta"] == 0.005 and new_params is not params
