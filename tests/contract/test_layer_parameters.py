"""MoELayer names what is wrong in its parameters, their dtypes and an overflow, in the caller's
terms (regressions: each test failed before its fix)."""
from __future__ import annotations

import numpy as np
import pytest

from helpers import small_layer as layer


# ------------------------------------------------------------------ parameters
@pytest.mark.parametrize("name", ["w_router", "b_router", "w1", "b2"])
def test_non_finite_parameter_is_named(name):
    m = layer()
    m.params[name].flat[0] = np.nan
    x = np.random.default_rng(0).normal(size=(16, 6)).astype(np.float32)
    with pytest.raises(ValueError, match=rf"params\['{name}'\]: expected finite values, got 1"):
        m.forward(x)


def test_parameter_shape_and_dtype_are_checked():
    m = layer()
    m.params["w1"] = m.params["w1"][:, :, :2]
    with pytest.raises(ValueError, match=r"params\['w1'\]: expected shape \[4, 6, 5\]"):
        m.forward(np.zeros((2, 6), np.float32))
    m = layer()
    m.params["b1"] = m.params["b1"].astype(np.float64)
    with pytest.raises(TypeError, match=r"params\['b1'\]: expected dtype float32"):
        m.forward(np.zeros((2, 6), np.float32))
    m.params["b1"] = "zeros"
    with pytest.raises(TypeError, match=r"params\['b1'\]: expected a numpy array"):
        m.forward(np.zeros((2, 6), np.float32))


def test_forward_overflow_is_said_in_the_callers_terms():
    m = layer()
    m.params["w1"][...] = 1e30  # finite, but x @ w1 overflows float32
    with pytest.raises(ValueError, match=r"^x: the expert outputs overflowed to inf/NaN in "
                                         r"float32 although x and every parameter are finite"):
        m.forward(np.full((4, 6), 1e10, np.float32))
    m = layer()
    m.params["w_router"][...] = 1.0
    with pytest.raises(ValueError, match=r"^x: the router logits .* overflowed"):
        m.forward(np.full((4, 6), 1e38, np.float32))


def test_backward_overflow_names_dy_not_an_internal_argument():
    m = layer(dtype=np.float32, aux_loss_coef=0.0)
    x = np.random.default_rng(0).normal(size=(8, 6)).astype(np.float32)
    m.forward(x)
    with pytest.raises(ValueError, match=r"^dy: .*overflowed") as err:
        m.backward(np.full((8, 6), 3e38, np.float32))
    assert "dgate" not in str(err.value)


# ------------------------------------------------------------------ dtype=None
def test_layer_dtype_none_is_an_error():
    with pytest.raises(TypeError, match=r"dtype: expected float16, float32 or float64, got None"):
        layer(dtype=None)


@pytest.mark.parametrize("name, value", [("capacity_factor", None), ("k", 1),
                                         ("aux_loss_coef", 0.0)])
def test_assigning_a_keyword_raises_instead_of_being_ignored(name, value):
    """forward() reads layer.options / layer.expert_options: an assigned attribute would be
    silently ignored (03_train's evaluation once routed with capacity 1.25 that way)."""
    import dataclasses

    import pymoe

    lay = pymoe.MoELayer(4, 8, 4, 2)
    with pytest.raises(AttributeError, match=rf"^{name}: a MoELayer's keywords are fixed"):
        setattr(lay, name, value)
    which = "options" if name in ("capacity_factor", "k") else "expert_options"
    setattr(lay, which, dataclasses.replace(getattr(lay, which), **{name: value}))
    assert getattr(lay, name) == value
