"""composeopt: composable optimiser rules for NumPy, CuPy and any array-API array.

Rules are small mutable objects (`init(x)`, `apply_(state, x, dx)`),
`Optimiser(a, b, c)` chains them, and `update_(opt, params, grads)` updates
any tree of arrays in place:

```python
import numpy as np, composeopt as co
params = {"W": np.random.randn(10, 10), "b": np.zeros(10)}
opt = co.Optimiser(co.ClipNorm(1.0), co.WeightDecay(1e-4), co.Adam(1e-3))
co.update_(opt, params, grads)
```
"""

from __future__ import annotations

from . import errors, registry, schedules
from ._dispatch import namespace
from .chain import Optimiser, OptimiserChain
from .checkpoint import load, load_state_dict, save, state_dict
from .control import adjust_, freeze_, hyperparameters, thaw_
from .engine import reset_, state_store, update, update_
from .flat import Flat, flatten
from .groups import Groups
from .hyper import Hyper
from .kernel import Kernel
from .minimizer import MinimizeResult, minimize
from .rule import Replace, Rule, State
from .rules.adam import AdaBelief, Adam, AdaMax, AdamW, Adan, AMSGrad, NAdam, OAdam, RAdam, Yogi
from .rules.adaptive import AdaDelta, AdaGrad, RMSProp
from .rules.clip import ClipGlobalNorm, ClipGrad, ClipNorm, ClipValue
from .rules.decay import ExpDecay, InvDecay, WeightDecay
from .rules.factored import SM3, Adafactor
from .rules.ftrl import FTRL
from .rules.layerwise import Fromage, GradCentralization, Lamb, Lars, Novograd
from .rules.lbfgs import LBFGS
from .rules.muon import Muon
from .rules.precision import MixedPrecision
from .rules.sgd import SGD, Descent, Momentum, Nesterov
from .rules.sign import Lion, Rprop, SignDecay
from .rules.steps import AccumGrad, SkipNonFinite
from .rules.wrappers import Lookahead
from .schedules import *  # noqa: F403 - every schedule, listed in schedules.__all__

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
    "minimize",
    "MinimizeResult",
    # steering and checkpoints
    "adjust_",
    "freeze_",
    "thaw_",
    "hyperparameters",
    "state_dict",
    "load_state_dict",
    "save",
    "load",
    "flatten",
    "Flat",
    # building blocks for new rules
    "Rule",
    "State",
    "Replace",
    "Hyper",
    "Kernel",
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
    "Groups",
    "Rprop",
    "Lion",
    "SignDecay",
    "Yogi",
    "Adan",
    "FTRL",
    "Lamb",
    "Lars",
    "Novograd",
    "Fromage",
    "GradCentralization",
    "Adafactor",
    "SM3",
    "Muon",
    "LBFGS",
    # wrappers, steps, precision
    "Lookahead",
    "AccumGrad",
    "SkipNonFinite",
    "MixedPrecision",
    # factories: chains of the rules above
    "SGD",
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
__all__ += schedules.__all__
