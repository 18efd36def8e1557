"""Zaya's MLP router with a cross-layer router state (router_mlp, router_state_input;
pymoe.variants.router_mlp)."""
from __future__ import annotations

import numpy as np
import pytest

import pymoe
from helpers import numerical_grad, randomize, rel_error
from pymoe.variants.router_mlp import gelu_erf, gelu_erf_backward


def test_gelu_erf_by_hand():
    """gelu(z) = z Phi(z): 0 at 0, Phi(1) = 0.8413447460685429 at 1 (the normal table), -gelu(-z)
    = z - gelu(z); its derivative at 0 is Phi(0) = 1/2."""
    z = np.array([0.0, 1.0, -1.0])
    np.testing.assert_allclose(gelu_erf(z), [0.0, 0.8413447460685429, -0.15865525393145707],
                               rtol=1e-15)
    np.testing.assert_allclose(gelu_erf_backward(np.ones(1), np.zeros(1)), [0.5], rtol=1e-15)


def _stack():
    kw = dict(dtype=np.float64, router_mlp=3, null_experts=1, activation="swiglu")
    first = pymoe.MoELayer(4, 3, 5, 1, None, seed=1, **kw)
    second = pymoe.MoELayer(4, 3, 5, 1, None, seed=2, router_state_input=True, **kw)
    for i, layer in enumerate((first, second)):
        randomize(layer, i + 1)
        layer.params["router_norm_weight"][...] += 1.0  # away from 0: every path carries
    second.params["router_state_scale"][...] = 0.8
    first.params["b_router"][4] += 0.8  # some tokens take the null (skip) expert
    return first, second


def test_two_layers_thread_the_state_and_match_finite_differences():
    """docs/variants.md's loop: forward first to last passing layer.router_state, backward last
    to first passing layer.router_state_grad; every gradient of both layers and dx against
    central differences of the two layers' objective."""
    first, second = _stack()
    rng = np.random.default_rng(0)
    x1, x2 = rng.standard_normal((6, 4)), rng.standard_normal((6, 4))
    dy1, dy2 = rng.standard_normal((6, 4)), rng.standard_normal((6, 4))

    def objective() -> float:
        y1 = first.forward(x1)
        y2 = second.forward(x2, router_state=first.router_state)
        return float((y1 * dy1).sum() + (y2 * dy2).sum() + first.loss_terms()
                     + second.loss_terms())
    objective()
    chosen = [layer.routing.expert_index.copy() for layer in (first, second)]
    second.backward(dy2)
    assert first.router_state.shape == (6, 3) and second.router_state_grad is not None
    dx1 = first.backward(dy1, d_router_state=second.router_state_grad)
    assert first.router_state_grad is None  # the first layer reads no state
    grads = [{n: g.copy() for n, g in layer.grads.items()} for layer in (first, second)]
    assert rel_error(dx1, numerical_grad(objective, x1)) < 1e-6
    for layer, g in zip((first, second), grads):
        for name, p in layer.params.items():
            assert rel_error(g[name], numerical_grad(objective, p)) < 1e-6, name
    objective()  # the routing did not flip while perturbing (it is piecewise constant)
    for layer, c in zip((first, second), chosen):
        np.testing.assert_array_equal(layer.routing.expert_index, c)
    assert 0 < (chosen[0] == 4).sum() < 6


def test_refusals_name_the_keyword():
    with pytest.raises(ValueError, match="router_state_input: needs router_mlp"):
        pymoe.MoELayer(4, 3, 4, 1, router_state_input=True)
    with pytest.raises(ValueError, match="router_mlp: not supported with token groups"):
        pymoe.MoELayer(4, 3, 4, 1, router_mlp=2, token_groups=2)
    layer = pymoe.MoELayer(4, 3, 4, 1, router_mlp=2)
    x = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="router_state: this layer reads no router state"):
        layer.forward(x, router_state=np.zeros((3, 2)))
    plain = pymoe.MoELayer(4, 3, 4, 1)
    plain.forward(x)
    with pytest.raises(ValueError, match="d_router_state: this layer has no MLP router"):
        plain.backward(x, d_router_state=np.zeros((3, 2)))
    reading = pymoe.MoELayer(4, 3, 4, 1, router_mlp=2, router_state_input=True)
    with pytest.raises(ValueError, match="router_state"):
        reading.forward(x, router_state=np.zeros((3, 5)))
