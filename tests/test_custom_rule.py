"""A user-defined rule is a subclass with a few hyperparameters, init and apply_."""

from __future__ import annotations

import numpy as np

import composeopt as co
from composeopt.hyper import nonnegative, unit_interval


class SignMomentum(co.Rule):
    """Momentum on the sign of the gradient (signum)."""

    eta = co.Hyper(0.01, nonnegative)
    rho = co.Hyper(0.9, unit_interval)

    def init(self, x):
        return co.State(m=co.namespace(x).zeros_like(x))

    def apply_(self, state, x, dx):
        xp = co.namespace(x)
        state.m = self.rho * state.m + (1 - self.rho) * dx
        return self.eta * xp.sign(state.m)


def test_a_user_rule_works_alone_in_a_chain_and_with_repr(backend):
    x = backend.asarray([1.0, -2.0, 0.0])
    opt = co.Optimiser(co.WeightDecay(0.0), SignMomentum(0.5, 0.0))
    co.update_(opt, x, backend.asarray([3.0, -1.0, 0.0]))
    np.testing.assert_array_equal(backend.to_numpy(x), [0.5, -1.5, 0.0])
    assert repr(opt[1]) == "SignMomentum(eta=0.5, rho=0.0)"


def test_a_minimal_rule_needs_only_apply():
    class Halve(co.Rule):
        def apply_(self, state, x, dx):
            return dx / 2

    x = np.array([4.0])
    co.update_(Halve(), x, np.array([2.0]))
    assert x[0] == 3.0 and repr(Halve()) == "Halve()"
