"""Every built-in rule, and the cases that the generic contract tests run.

`RULES` maps each public rule name to its class.  `CASES` maps a readable
id to a factory: each rule at its defaults, the variants that take other code
paths, and a few chains.  A new rule goes in both; a test checks that
`RULES` and `composeopt.__all__` list the same rules.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from .chain import Optimiser
from .groups import Groups
from .rule import Rule
from .rules.adam import AdaBelief, Adam, AdaMax, AdamW, Adan, AMSGrad, NAdam, OAdam, RAdam, Yogi
from .rules.adaptive import AdaDelta, AdaGrad, RMSProp
from .rules.clip import ClipGlobalNorm, ClipNorm, ClipValue
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
from .schedules import CosineAnnealing, Linear, Step, Warmup

__all__ = ["RULES", "ALIASES", "CASES"]

RULES: dict[str, type[Rule]] = {
    cls.__name__: cls
    for cls in (
        Descent,
        Momentum,
        Nesterov,
        RMSProp,
        AdaGrad,
        AdaDelta,
        Adam,
        RAdam,
        AdaMax,
        NAdam,
        AMSGrad,
        OAdam,
        AdamW,
        AdaBelief,
        WeightDecay,
        ExpDecay,
        InvDecay,
        ClipValue,
        ClipNorm,
        ClipGlobalNorm,
        Optimiser,
        Groups,
        AccumGrad,
        SkipNonFinite,
        MixedPrecision,
        Rprop,
        Lion,
        SignDecay,
        Yogi,
        Adan,
        FTRL,
        Lamb,
        Lars,
        Novograd,
        Fromage,
        GradCentralization,
        Adafactor,
        SM3,
        Lookahead,
        Muon,
        LBFGS,
    )
}

# Other names users know the rules by: Optimisers.jl's, and Flux's old upper-case ones.
ALIASES: dict[str, type[Rule]] = {
    "OptimiserChain": Optimiser,
    "ClipGrad": ClipValue,
    "ADAM": Adam,
    "RADAM": RAdam,
    "NADAM": NAdam,
    "OADAM": OAdam,
    "ADAMW": AdamW,
    "ADAGrad": AdaGrad,
    "ADADelta": AdaDelta,
    "ADAMax": AdaMax,
}

CASES: dict[str, Callable[[], Rule]] = {
    "Descent()": Descent,
    "Momentum()": Momentum,
    "Nesterov()": Nesterov,
    "RMSProp()": RMSProp,
    "RMSProp(centred=True)": lambda: RMSProp(centred=True),
    "AdaGrad()": AdaGrad,
    "AdaDelta()": AdaDelta,
    "Adam()": Adam,
    "RAdam()": RAdam,
    "AdaMax()": AdaMax,
    "NAdam()": NAdam,
    "AMSGrad()": AMSGrad,
    "OAdam()": OAdam,
    "AdamW()": AdamW,
    "AdamW(lambda_=0.01, couple=False)": lambda: AdamW(lambda_=0.01, couple=False),
    "AdaBelief()": AdaBelief,
    "WeightDecay()": WeightDecay,
    "ExpDecay()": ExpDecay,
    "ExpDecay(0.1, 0.5, 2)": lambda: ExpDecay(0.1, 0.5, 2),
    "InvDecay()": InvDecay,
    "ClipValue(0.5)": lambda: ClipValue(0.5),
    "ClipNorm()": ClipNorm,
    "ClipNorm(0.5, p=inf, throw=False)": lambda: ClipNorm(0.5, math.inf, throw=False),
    "ClipGlobalNorm(1.0)": lambda: ClipGlobalNorm(1.0),
    "ClipGlobalNorm(0.5, p=1)": lambda: ClipGlobalNorm(0.5, 1),
    "Optimiser()": Optimiser,
    "Optimiser(ClipNorm, WeightDecay, Adam)": lambda: Optimiser(ClipNorm(1.0), WeightDecay(1e-4), Adam(1e-2)),
    "Optimiser(ExpDecay, Descent)": lambda: Optimiser(ExpDecay(0.1, 0.5, 3), Descent(1.0)),
    "Optimiser(ClipGlobalNorm, Optimiser(WeightDecay, Momentum))": lambda: Optimiser(
        ClipGlobalNorm(1.0), Optimiser(WeightDecay(1e-3), Momentum(0.05))
    ),
    "Optimiser(Momentum, ClipGlobalNorm, InvDecay)": lambda: Optimiser(
        Momentum(0.1), ClipGlobalNorm(0.5), InvDecay(0.1)
    ),
    "Adam(eta=Warmup(CosineAnnealing))": lambda: Adam(eta=Warmup(CosineAnnealing(1e-2, 20), 5)),
    "Optimiser(WeightDecay(Step), Momentum(rho=Linear))": lambda: Optimiser(
        WeightDecay(Step(1e-3, 5, 0.5)), Momentum(0.05, rho=Linear(0.5, 0.9, 10))
    ),
    "AccumGrad(2)": lambda: AccumGrad(2),
    "Optimiser(AccumGrad(3), Adam)": lambda: Optimiser(AccumGrad(3), Adam(1e-2)),
    "Optimiser(ClipValue, AccumGrad(2), ClipGlobalNorm, Momentum)": lambda: Optimiser(
        ClipValue(5.0), AccumGrad(2), ClipGlobalNorm(1.0), Momentum(0.05)
    ),
    "SkipNonFinite(Adam)": lambda: SkipNonFinite(Adam(1e-2)),
    "SkipNonFinite(Optimiser(ClipGlobalNorm, Momentum), max_consecutive=3)": lambda: SkipNonFinite(
        Optimiser(ClipGlobalNorm(1.0), Momentum(0.05)), 3
    ),
    "MixedPrecision(Adam)": lambda: MixedPrecision(Adam(1e-2)),
    "MixedPrecision(Optimiser(WeightDecay, Momentum), float64)": lambda: MixedPrecision(
        Optimiser(WeightDecay(1e-3), Momentum(0.05)), "float64"
    ),
    "SGD(momentum, nesterov, weight_decay)": lambda: SGD(
        0.05, momentum=0.9, nesterov=True, weight_decay=1e-3
    ),
    "Groups(b: Adam, default: AdamW)": lambda: Groups(("b", Adam(1e-2)), default=AdamW(1e-2, lambda_=0.01)),
    "Optimiser(ClipGlobalNorm, Groups(W: Momentum, default: Descent))": lambda: Optimiser(
        ClipGlobalNorm(2.0), Groups(("W", Momentum(0.05)), default=Descent(0.05))
    ),
    "Rprop()": Rprop,
    "Rprop(0.05, ell=(0.3, 1.5), gamma=(1e-3, 0.2))": lambda: Rprop(0.05, (0.3, 1.5), (1e-3, 0.2)),
    # Lion moves each element by exactly eta: at its default 1e-4 a float16 parameter near 1
    # (spacing 1e-3) would not move at all.
    "Lion(eta=0.01)": lambda: Lion(eta=0.01),
    "SignDecay()": SignDecay,
    "Optimiser(SignDecay, Lion)": lambda: Optimiser(SignDecay(0.1), Lion(0.01, (0.5, 0.9))),
    "Yogi()": Yogi,
    "Adan()": Adan,
    "Adan(0.01, lambda_=0.1)": lambda: Adan(0.01, lambda_=0.1),
    "FTRL()": FTRL,
    "FTRL(0.1, l1=0.01, l2=0.1)": lambda: FTRL(0.1, l1=0.01, l2=0.1),
    "FTRL(lr_power=-0.7)": lambda: FTRL(lr_power=-0.7),
    "Lamb()": Lamb,
    "Lamb(lambda_=0.01)": lambda: Lamb(lambda_=0.01),
    "Lars()": Lars,
    "Lars(lambda_=1e-3, epsilon=1e-8, nesterov=True)": lambda: Lars(
        lambda_=1e-3, epsilon=1e-8, nesterov=True
    ),
    "Novograd()": Novograd,
    "Novograd(lambda_=1e-3)": lambda: Novograd(lambda_=1e-3),
    "Fromage()": Fromage,
    "Fromage(min_norm=0.0)": lambda: Fromage(min_norm=0.0),
    "GradCentralization()": GradCentralization,
    "Optimiser(GradCentralization, Adam)": lambda: Optimiser(GradCentralization(), Adam(1e-2)),
    "Adafactor()": Adafactor,
    "Adafactor(factored, momentum, lambda_)": lambda: Adafactor(
        min_dim_size_to_factor=2, momentum=0.9, lambda_=1e-3
    ),
    "Adafactor(clipping_threshold=None, multiply_by_parameter_scale=False)": lambda: Adafactor(
        clipping_threshold=None, multiply_by_parameter_scale=False
    ),
    "SM3()": SM3,
    "SM3(momentum=0.0)": lambda: SM3(momentum=0.0),
    "Lookahead(Adam)": lambda: Lookahead(Adam(1e-2)),
    "Lookahead(Optimiser(ClipGlobalNorm, Momentum(rho=Linear)), k=3)": lambda: Lookahead(
        Optimiser(ClipGlobalNorm(1.0), Momentum(0.05, rho=Linear(0.5, 0.9, 10))), k=3, alpha=0.8
    ),
    "Groups(W: Lookahead(Momentum), default: Descent)": lambda: Groups(
        ("W", Lookahead(Momentum(0.05), k=2)), default=Descent(0.05)
    ),
    "Muon()": Muon,
    "Muon(nesterov=False, lambda_, match_rms_adamw, fallback=Optimiser)": lambda: Muon(
        0.05,
        nesterov=False,
        lambda_=0.01,
        shape_scaling="match_rms_adamw",
        fallback=Optimiser(ClipGlobalNorm(1.0), Momentum(0.05)),
    ),
    "LBFGS()": LBFGS,
    "LBFGS(0.5, memory=2)": lambda: LBFGS(0.5, memory=2),
    "Optimiser(WeightDecay, LBFGS)": lambda: Optimiser(WeightDecay(1e-3), LBFGS(memory=3)),
}
