"""Dense (einsum over [T, E, C]) and indexed (gather/scatter) formulations agree, forward and backward."""
import numpy as np
import pytest

import pymoe
from helpers import oracle_layer_forward, randomize
from props import given, st

# Both formulations do the same float64 arithmetic in different orders (einsum over E*C versus a
# sum over K; BLAS over C rows versus the filled rows): the only differences are round-off.
TOL = 1e-12


def _pair(**kw):
    layers = [pymoe.MoELayer(formulation=f, backend="numpy", dtype=np.float64, **kw)
              for f in ("dense", "indexed")]
    randomize(layers[0], seed=kw["seed"])
    layers[1].params = {n: p.copy() for n, p in layers[0].params.items()}
    return layers


def _assert_close(a, b, what):
    scale = max(1.0, float(np.abs(b).max(initial=0.0)))
    np.testing.assert_allclose(a, b, rtol=0, atol=TOL * scale, err_msg=what)


@given(T=st.integers(0, 24), D=st.integers(1, 6), H=st.integers(1, 6), E=st.integers(1, 6),
       data=st.data())
def test_dense_equals_indexed(T, D, H, E, data):
    k = data.draw(st.integers(1, E))
    kw = dict(d_model=D, d_hidden=H, num_experts=E, k=k,
              capacity_factor=data.draw(st.one_of(st.none(), st.floats(0.1, 2.5))),
              min_capacity=data.draw(st.integers(0, 3)),
              normalize=data.draw(st.booleans()) and k > 1,
              priority=data.draw(st.sampled_from(["choice", "score"])),
              activation=data.draw(st.sampled_from(["relu", "gelu"])),
              aux_loss_coef=0.1, z_loss_coef=0.01, seed=data.draw(st.integers(0, 1000)))
    dense, indexed = _pair(**kw)
    rng = np.random.default_rng(kw["seed"])
    x, dy = rng.normal(size=(T, D)), rng.normal(size=(T, D))
    y_d, y_i = dense.forward(x), indexed.forward(x)
    np.testing.assert_array_equal(dense.routing.position, indexed.routing.position)
    _assert_close(y_i, y_d, "y")
    assert indexed.aux_loss == dense.aux_loss and indexed.z_loss == dense.z_loss
    _assert_close(indexed.backward(dy), dense.backward(dy), "dx")
    for name in dense.grads:
        _assert_close(indexed.grads[name], dense.grads[name], name)


@pytest.mark.parametrize("formulation", ["dense", "indexed"])
@pytest.mark.parametrize("priority", ["choice", "score"])
def test_layer_matches_the_token_by_token_oracle(formulation, priority):
    layer = pymoe.MoELayer(5, 7, 4, 2, 0.75, priority=priority, activation="gelu",
                           formulation=formulation, dtype=np.float64, seed=3)
    randomize(layer, seed=4)
    x = np.random.default_rng(2).normal(size=(20, 5))
    y = layer.forward(x)
    y_ref, r = oracle_layer_forward(layer, x)
    np.testing.assert_array_equal(layer.routing.position, r["position"])
    assert layer.routing.dropped_fraction > 0
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-12)
