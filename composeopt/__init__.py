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
from .minimizer import MinimizeResult, minimize
from .rule import Replace, Rule, State
from .rules.adam import AdaBelief, Adam, AdaMax, AdamW, AMSGrad, NAdam, OAdam, RAdam
from .rules.adaptive import AdaDelta, AdaGrad, RMSProp
from .rules.clip import ClipGlobalNorm, ClipGrad, ClipNorm, ClipValue
from .rules.decay import ExpDecay, InvDecay, WeightDecay
from .rules.lbfgs import LBFGS
from .rules.muon import Muon
from .rules.sgd import Descent, Momentum, Nesterov
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
    "Lookahead",
    "Muon",
    "LBFGS",
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
