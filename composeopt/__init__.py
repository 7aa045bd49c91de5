"""composeopt: composable optimiser rules for NumPy, CuPy and any array-API array.

Rules are small mutable objects (``init(x)``, ``apply_(state, x, dx)``),
``Optimiser(a, b, c)`` chains them, and ``update_(opt, params, grads)`` updates
any tree of arrays in place::

    import numpy as np, composeopt as co
    params = {"W": np.random.randn(10, 10), "b": np.zeros(10)}
    opt = co.Optimiser(co.ClipNorm(1.0), co.WeightDecay(1e-4), co.Adam(1e-3))
    co.update_(opt, params, grads)
"""

from __future__ import annotations

from . import errors, registry
from ._dispatch import namespace
from .chain import Optimiser, OptimiserChain
from .engine import reset_, state_store, update, update_
from .flat import Flat, flatten
from .hyper import Hyper
from .rule import Rule, State
from .rules.adam import AdaBelief, Adam, AdaMax, AdamW, AMSGrad, NAdam, OAdam, RAdam
from .rules.adaptive import AdaDelta, AdaGrad, RMSProp
from .rules.clip import ClipGlobalNorm, ClipGrad, ClipNorm, ClipValue
from .rules.decay import ExpDecay, InvDecay, WeightDecay
from .rules.sgd import Descent, Momentum, Nesterov

# Flux's upper-case names from before Optimisers.jl.
ADAM = Adam
RADAM = RAdam
NADAM = NAdam
OADAM = OAdam
ADAMW = AdamW
ADAGrad = AdaGrad
ADADelta = AdaDelta
ADAMax = AdaMax

__version__ = "0.1.0"

__all__ = [
    # engine
    "update_",
    "update",
    "reset_",
    "state_store",
    "flatten",
    "Flat",
    # building blocks for new rules
    "Rule",
    "State",
    "Hyper",
    "namespace",
    "errors",
    "registry",
    # rules
    "Descent",
    "Momentum",
    "Nesterov",
    "RMSProp",
    "AdaGrad",
    "AdaDelta",
    "Adam",
    "RAdam",
    "AdaMax",
    "NAdam",
    "AMSGrad",
    "OAdam",
    "AdamW",
    "AdaBelief",
    "WeightDecay",
    "ExpDecay",
    "InvDecay",
    "ClipValue",
    "ClipNorm",
    "ClipGlobalNorm",
    "Optimiser",
    # aliases
    "OptimiserChain",
    "ClipGrad",
    "ADAM",
    "RADAM",
    "NADAM",
    "OADAM",
    "ADAMW",
    "ADAGrad",
    "ADADelta",
    "ADAMax",
]
