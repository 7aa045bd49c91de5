"""Hyperparameters: defaults, positional order, validation, mutation between steps, repr."""

from __future__ import annotations

import inspect
import math
import re

import numpy as np
import pytest

import composeopt as co
from composeopt.errors import HyperparameterError


def test_positional_order_and_keywords_follow_flux_and_optimisers_jl():
    assert co.Adam(0.01, (0.8, 0.9), 1e-6).hyperparameters() == {
        "eta": 0.01,
        "beta": (0.8, 0.9),
        "epsilon": 1e-6,
    }
    assert co.AdamW(0.01, (0.8, 0.9), 0.1, 1e-6, False) == co.AdamW(
        eta=0.01, beta=(0.8, 0.9), lambda_=0.1, epsilon=1e-6, couple=False
    )
    assert co.ExpDecay(0.1, 0.5, 10, 1e-3, 5).hyperparameters() == {
        "eta": 0.1,
        "decay": 0.5,
        "decay_step": 10,
        "clip": 1e-3,
        "start": 5,
    }
    assert co.RMSProp().hyperparameters() == {"eta": 0.001, "rho": 0.9, "epsilon": 1e-8, "centred": False}
    assert co.Momentum().rho == 0.9 and co.Nesterov().eta == 0.001 and co.Descent().eta == 0.1
    assert co.AdaGrad().eta == 0.1 and co.AdaDelta().rho == 0.9 and co.AdaBelief().epsilon == 1e-16
    assert co.OAdam().beta == (0.5, 0.9) and co.WeightDecay().lambda_ == 5e-4
    assert co.InvDecay().gamma == 0.001 and co.ClipNorm().omega == 10.0


def test_repr_round_trips_a_chain_in_the_documented_form():
    opt = co.Optimiser(co.ClipNorm(1.0), co.Adam())
    assert repr(opt) == (
        "Optimiser(ClipNorm(omega=1.0, p=2, throw=True), Adam(eta=0.001, beta=(0.9, 0.999), epsilon=1e-08))"
    )
    assert eval(repr(opt), vars(co)) == opt
    inf_norm = co.ClipNorm(2.0, math.inf)
    assert eval(repr(inf_norm), vars(co)) == inf_norm


@pytest.mark.parametrize(
    "make",
    [
        lambda: co.Descent(-0.1),
        lambda: co.Descent(float("nan")),
        lambda: co.Descent(math.inf),
        lambda: co.Descent("0.1"),
        lambda: co.Descent(True),
        lambda: co.Momentum(rho=1.0),
        lambda: co.Momentum(rho=-0.1),
        lambda: co.Adam(beta=(0.9, 1.0)),
        lambda: co.Adam(beta=(-0.1, 0.9)),
        lambda: co.Adam(beta=0.9),
        lambda: co.Adam(beta=(0.9, 0.99, 0.9)),
        lambda: co.Adam(epsilon=-1e-8),
        lambda: co.RMSProp(centred=1),
        lambda: co.AdamW(lambda_=-1.0),
        lambda: co.ExpDecay(decay=0.0),
        lambda: co.ExpDecay(decay=1.5),
        lambda: co.ExpDecay(decay_step=0),
        lambda: co.ExpDecay(decay_step=2.5),
        lambda: co.ExpDecay(start=-1),
        lambda: co.InvDecay(gamma=-1.0),
        lambda: co.ClipValue(-1.0),
        lambda: co.ClipNorm(p=0),
        lambda: co.ClipNorm(p=-2),
        lambda: co.ClipNorm(throw="yes"),
        lambda: co.ClipGlobalNorm(-1.0),
    ],
)
def test_impossible_hyperparameters_raise_at_construction(make):
    with pytest.raises(HyperparameterError):
        make()


def test_invalid_assignment_raises_and_keeps_the_old_value():
    opt = co.Optimiser(co.ClipNorm(1.0), co.Adam(0.01))
    with pytest.raises(HyperparameterError, match=r"Adam\.eta: must be in \[0, inf\), got -1\.0"):
        opt[1].eta = -1
    with pytest.raises(HyperparameterError, match=r"Adam\.beta"):
        opt[1].beta = (0.9, 1.5)
    assert opt[1].eta == 0.01 and opt[1].beta == (0.9, 0.999)


def test_wrong_arguments_are_type_errors():
    with pytest.raises(TypeError, match="unexpected keyword argument 'lr'"):
        co.Adam(lr=0.1)
    with pytest.raises(TypeError, match="at most 3 positional"):
        co.Adam(0.1, (0.9, 0.99), 1e-8, 1)
    with pytest.raises(TypeError, match="multiple values for 'eta'"):
        co.Adam(0.1, eta=0.2)
    with pytest.raises(TypeError, match="missing required argument 'omega'"):
        co.ClipGlobalNorm()


def test_values_are_normalised():
    rule = co.ClipNorm(np.float32(2), p=2.0, throw=np.bool_(False))
    assert rule.omega == 2.0 and type(rule.omega) is float
    assert rule.p == 2 and type(rule.p) is int
    assert rule.throw is False
    assert co.ClipNorm(p=1.5).p == 1.5


def test_mutating_eta_takes_effect_at_the_next_step_and_keeps_state():
    x = np.array([1.0])
    opt = co.Momentum(0.1, 0.5)
    co.update_(opt, x, np.array([1.0]))  # v = 0.1
    opt.eta = 1.0
    co.update_(opt, x, np.array([1.0]))  # v = 0.5 * 0.1 + 1.0
    np.testing.assert_allclose(x, [1.0 - 0.1 - 1.05])


def test_mutating_a_rule_inside_a_chain_by_index():
    x = np.array([1.0])
    opt = co.Optimiser(co.ClipValue(10.0), co.WeightDecay(0.0), co.Descent(0.1))
    co.update_(opt, x, np.array([1.0]))
    opt[2].eta = 0.5
    opt[1].lambda_ = 1.0
    co.update_(opt, x, np.array([1.0]))  # x = 0.9 - 0.5 * (1 + 0.9)
    np.testing.assert_allclose(x, [0.9 - 0.5 * 1.9])


def test_equality_is_by_type_and_value_and_rules_are_unhashable():
    assert co.Adam() == co.Adam() and co.Adam() != co.Adam(0.1) and co.Adam() != co.NAdam()
    assert co.ADAM is co.Adam and co.ClipGrad is co.ClipValue and co.OptimiserChain is co.Optimiser
    with pytest.raises(TypeError):
        hash(co.Adam())


def test_rules_show_their_constructor_signature():
    import inspect

    assert str(inspect.signature(co.Adam)) == "(eta=0.001, beta=(0.9, 0.999), epsilon=1e-08)"
    assert str(inspect.signature(co.ClipGlobalNorm)) == "(omega, p=2)"
    assert "rules" in str(inspect.signature(co.Optimiser))


# --------------------------------------------------------------------------
# Unknown attributes: a misspelt hyperparameter is an error, not a new field
# --------------------------------------------------------------------------


def test_a_misspelt_hyperparameter_is_refused_and_the_value_stays():
    from composeopt.errors import UnknownHyperparameterError

    opt = co.Optimiser(co.ClipNorm(1.0), co.WeightDecay(), co.Adam())
    with pytest.raises(
        UnknownHyperparameterError, match=r"^Adam has no hyperparameter 'lr'; did you mean 'eta'\?"
    ):
        opt[2].lr = 0.5
    with pytest.raises(
        UnknownHyperparameterError, match=r"^Adam has no hyperparameter 'etta'; did you mean 'eta'\?"
    ):
        opt[2].etta = 0.3
    assert opt[2].eta == 0.001 and "lr" not in vars(opt[2]) and "etta" not in vars(opt[2])


def test_the_error_is_a_hyperparameter_error_and_an_attribute_error():
    from composeopt.errors import ComposeoptError, UnknownHyperparameterError

    assert issubclass(UnknownHyperparameterError, HyperparameterError)
    assert issubclass(UnknownHyperparameterError, ComposeoptError)
    assert issubclass(UnknownHyperparameterError, AttributeError)
    with pytest.raises(AttributeError):
        co.Descent().learning_rate = 0.1
    with pytest.raises(ValueError):  # HyperparameterError is a ValueError
        co.Descent().learning_rate = 0.1


@pytest.mark.parametrize(
    ("rule", "name", "suggestion"),
    [
        (co.Adam(), "lr", "eta"),
        (co.Adam(), "learning_rate", "eta"),
        (co.Adam(), "betas", "beta"),
        (co.Adam(), "eps", "epsilon"),
        (co.AdamW(), "weight_decay", "lambda_"),
        (co.WeightDecay(), "weight_decay", "lambda_"),
        (co.Momentum(), "momentum", "rho"),
        (co.Momentum(), "rh0", "rho"),
        (co.ExpDecay(), "decay_steps", "decay_step"),
        (co.AdamW(), "lambda", "lambda_"),
    ],
)
def test_torch_and_optax_names_and_typos_get_a_suggestion(rule, name, suggestion):
    with pytest.raises(
        AttributeError, match=rf"has no hyperparameter '{name}'; did you mean '{suggestion}'\?"
    ):
        setattr(rule, name, 0.1)


def test_a_name_far_from_every_hyperparameter_lists_them():
    with pytest.raises(AttributeError, match=r"Adam has no hyperparameter 'colour'.*eta, beta, epsilon"):
        co.Adam().colour = "red"


def test_reading_a_misspelt_hyperparameter_says_what_there_is():
    opt = co.Adam()
    with pytest.raises(AttributeError, match=r"Adam has no hyperparameter 'lr'; did you mean 'eta'\?"):
        opt.lr  # noqa: B018
    assert not hasattr(opt, "lr") and getattr(opt, "lr", None) is None
    assert hasattr(opt, "eta") and hasattr(opt, "fallible")


def test_a_chain_points_to_its_rules():
    opt = co.Optimiser(co.ClipNorm(1.0), co.Adam())
    with pytest.raises(AttributeError, match=r"Optimiser has no hyperparameter 'eta'.*opt\[1\]\.eta"):
        opt.eta = 0.1
    with pytest.raises(AttributeError, match=r"Optimiser has no hyperparameter 'lr'.*opt\[1\]\.eta"):
        opt.lr = 0.1


def test_private_class_level_and_own_attributes_stay_settable():
    opt = co.Adam()
    opt._note = "private attributes are the caller's business"
    opt.fallible = True  # a class-level attribute
    assert opt._note and opt.fallible is True
    chain = co.Optimiser(co.Descent())
    chain.rules = (co.Descent(0.2),)  # set by its own constructor
    assert chain[0].eta == 0.2
    groups = co.Groups(("*", co.Descent()), default=co.Adam())
    groups.default = co.Descent(0.3)
    lookahead = co.Lookahead(co.Adam())
    lookahead.inner = co.Descent()
    muon = co.Muon()
    muon.fallback = co.Adam()
    with pytest.raises(AttributeError, match="Muon has no hyperparameter 'fallbak'"):
        muon.fallbak = co.Adam()


def test_a_read_only_property_stays_read_only():
    with pytest.raises(AttributeError):
        co.Optimiser(co.Descent()).assigns = True


def test_user_rules_with_their_own_constructor_keep_working():
    class Scaled(co.Rule):
        eta = co.Hyper(0.1)

        def __init__(self, eta=0.1, scale=2.0):
            self.scale = scale  # a plain attribute, set before the hyperparameters
            super().__init__(eta)
            self.offset = 0.0  # and one after

        def apply_(self, state, x, dx):
            return self.eta * self.scale * dx + self.offset

    class MoreScaled(Scaled):
        def __init__(self, factor=3.0):
            super().__init__(scale=factor)
            self.factor = factor

        def apply_(self, state, x, dx):
            return super().apply_(state, x, dx) * self.factor

    rule = Scaled(0.5, 4.0)
    assert (rule.eta, rule.scale, rule.offset) == (0.5, 4.0, 0.0)
    rule.scale = 1.0  # already its own attribute: still settable
    x = np.array([1.0])
    co.update_(rule, x, np.array([1.0]))
    np.testing.assert_allclose(x, [0.5])
    with pytest.raises(AttributeError, match="Scaled has no hyperparameter 'scael'; did you mean 'scale'"):
        rule.scael = 3.0
    nested = MoreScaled()
    assert (nested.scale, nested.factor) == (3.0, 3.0)
    with pytest.raises(AttributeError, match="MoreScaled has no hyperparameter 'lr'"):
        nested.lr = 1.0
    assert str(__import__("inspect").signature(Scaled)) == "(eta=0.1, scale=2.0)"


def test_a_constructor_that_fails_half_way_leaves_no_open_window():
    class Picky(co.Rule):
        def __init__(self, fail):
            self.before = 1
            if fail:
                raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        Picky(True)
    rule = Picky(False)
    with pytest.raises(AttributeError):
        rule.after = 2
    assert not [name for name in vars(rule) if name.startswith("_")]


def test_adjust_copies_and_checkpoints_still_set_hyperparameters(tmp_path):
    import copy

    opt = co.Optimiser(co.WeightDecay(), co.Adam())
    co.adjust_(opt, 0.01, lambda_=0.1)
    assert opt[1].eta == 0.01 and opt[0].lambda_ == 0.1
    with pytest.raises(HyperparameterError, match="no rule"):
        co.adjust_(opt, lr=0.1)
    clone = copy.deepcopy(opt)
    assert clone == opt
    clone[1].eta = 0.5
    with pytest.raises(AttributeError):
        clone[1].lr = 0.5


# --- what help() shows ----------------------------------------------------------------


def help_text(cls: type) -> str:
    import pydoc

    return pydoc.render_doc(cls, renderer=pydoc.plaintext)


def test_help_shows_the_hyperparameters_with_their_text_and_no_kernel():
    text = help_text(co.Adam)
    assert "Kernel(" not in text and "fused" not in text and "_kernel" not in text
    for name, line in [
        ("eta", r"learning rate \$\\eta \\ge 0\$\."),
        ("beta", r"decays \$\(\\beta_1, \\beta_2\)\$ of the first and second moments, each in \[0, 1\)\."),
        ("epsilon", r"\$\\epsilon\$, outside the square root \(floored for float16\)\."),
    ]:
        assert re.search(rf"^ \|  {name}\n \|      {line}$", text, re.M), name


def test_help_of_every_rule_hides_its_fast_path_and_describes_each_hyperparameter():
    from composeopt.registry import RULES

    for name, cls in RULES.items():
        text = help_text(cls)
        assert "Kernel(" not in text and "NormClip(" not in text, name
        assert not re.search(r"^ \|  \w*(fused|kernel)\w*\b", text, re.M), name  # prose may say "fused"
        for field in cls._hyper_names:
            doc = getattr(cls, field).__doc__
            assert doc and "\n" not in doc, f"{name}.{field} has no one-line text for help()"
            assert f" |  {field}\n |      {doc}" in text, f"{name}.{field}"


def test_a_rules_docstring_args_describe_its_fields_and_doc_overrides_them():
    class Blend(co.Rule):
        """Blend.

        Args:
            rho: weight of the past,
                in [0, 1).
            scale (float): the step.

        Examples:
            none
        """

        rho: co.Hyper[float] = co.Hyper(default=0.5)
        scale: co.Hyper[float] = co.Hyper(default=1.0, doc="how far to go")
        gain: co.Hyper[float] = co.Hyper(default=1.0)

    assert Blend.rho.__doc__ == "weight of the past, in [0, 1)."
    assert Blend.scale.__doc__ == "how far to go"
    assert Blend.gain.__doc__ is None
    assert "how far to go" in help_text(Blend) and "Hyper(" not in help_text(Blend)
    assert repr(Blend.rho) == "Hyper(default=0.5, check=None)"
    assert repr(co.Adam.beta) == "HyperTuple(default=(0.9, 0.999), check=beta_pair)"


def test_fields_declared_for_type_checkers_behave_as_before():
    class Annotated(co.Rule):
        scale: co.Hyper[float] = co.Hyper(check=co.hyper.nonnegative)
        beta: co.hyper.HyperTuple[tuple[float, float]] = co.hyper.HyperTuple(
            default=(0.9, 0.99), check=co.hyper.beta_pair
        )

    class Plain(co.Rule):
        scale = co.Hyper(co.hyper.REQUIRED, co.hyper.nonnegative)
        beta = co.Hyper((0.9, 0.99), co.hyper.beta_pair)

    for cls in (Annotated, Plain):
        assert str(inspect.signature(cls)) == "(scale, beta=(0.9, 0.99))"
        rule = cls(2.0, beta=(co.Linear(0.5, 0.9, 10), 0.99))
        assert rule.hyperparameters() == {"scale": 2.0, "beta": (0.5, 0.99)}
        with pytest.raises(TypeError, match="missing required argument 'scale'"):
            cls()
        with pytest.raises(HyperparameterError, match="scale: must be in"):
            cls(-1.0)
