"""Gradients of every parameter and of x against central finite differences in float64."""
import numpy as np
import pytest

import pymoe
from helpers import FD_RTOL, check_layer_gradients, numerical_grad, randomize, rel_error


@pytest.mark.parametrize("formulation", ["indexed", "dense"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("drops", [False, True])
def test_layer_gradients_match_finite_differences(formulation, activation, normalize, drops):
    T, D, H, E, K = 12, 4, 6, 4, 2
    cf = 0.5 if drops else None
    layer = pymoe.MoELayer(D, H, E, K, cf, normalize=normalize, activation=activation,
                           aux_loss_coef=0.3, z_loss_coef=0.05, formulation=formulation,
                           backend="numpy", dtype=np.float64, seed=0)
    randomize(layer, seed=11)
    rng = np.random.default_rng(5)
    x, dy = rng.normal(size=(T, D)), rng.normal(size=(T, D))
    layer.forward(x)
    assert (layer.routing.dropped_fraction > 0) == drops
    errors = check_layer_gradients(layer, x, dy)
    assert max(errors.values()) <= FD_RTOL, errors


def test_gradients_with_priority_score_k1_and_batched_input():
    layer = pymoe.MoELayer(3, 5, 3, 1, 0.7, priority="score", aux_loss_coef=0.2,
                           z_loss_coef=0.1, dtype=np.float64, seed=2)
    randomize(layer, seed=3)
    rng = np.random.default_rng(9)
    x, dy = rng.normal(size=(2, 5, 3)), rng.normal(size=(2, 5, 3))  # [..., D]
    layer.forward(x)
    assert layer.routing.dropped_fraction > 0
    errors = check_layer_gradients(layer, x, dy)
    assert max(errors.values()) <= FD_RTOL, errors


def test_gradients_through_router_jitter():
    layer = pymoe.MoELayer(4, 5, 4, 2, 1.0, jitter_eps=0.3, aux_loss_coef=0.1,
                           dtype=np.float64, seed=4)
    randomize(layer, seed=8)
    rng = np.random.default_rng(10)
    x, dy = rng.normal(size=(10, 4)), rng.normal(size=(10, 4))

    def same_noise():
        layer._noise_rng = np.random.default_rng(123)  # identical noise for every evaluation

    errors = check_layer_gradients(layer, x, dy, train=True, reset_noise=same_noise)
    assert max(errors.values()) <= FD_RTOL, errors


@pytest.mark.parametrize("normalize", [False, True])
def test_route_backward_matches_finite_differences(normalize):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(9, 5)) * 2
    dgate = rng.normal(size=(9, 2))

    def objective():
        r = pymoe.route(logits, 2, 0.6, normalize=normalize)
        return float(np.sum(r.gate * dgate)) + 0.7 * r.aux_loss + 0.2 * r.z_loss

    r = pymoe.route(logits, 2, 0.6, normalize=normalize)
    assert r.dropped_fraction > 0
    got = pymoe.route_backward(r, dgate, aux_loss_coef=0.7, z_loss_coef=0.2)
    assert rel_error(got, numerical_grad(objective, logits)) <= FD_RTOL


def test_float32_layer_gradients_track_float64():
    """A float32 layer's analytic gradients equal the float64 ones to float32 accuracy."""
    rng = np.random.default_rng(1)
    x, dy = rng.normal(size=(16, 6)), rng.normal(size=(16, 6))
    ref = pymoe.MoELayer(6, 8, 4, 2, 1.0, aux_loss_coef=0.1, dtype=np.float64, seed=1)
    f32 = pymoe.MoELayer(6, 8, 4, 2, 1.0, aux_loss_coef=0.1, dtype=np.float32, seed=1)
    randomize(ref, seed=2)
    f32.params = {n: p.astype(np.float32) for n, p in ref.params.items()}
    ref.forward(x), f32.forward(x.astype(np.float32))
    np.testing.assert_array_equal(ref.routing.position, f32.routing.position)
    dx64, dx32 = ref.backward(dy), f32.backward(dy.astype(np.float32))
    assert dx32.dtype == np.float32
    assert rel_error(dx32, dx64) < 1e-5
    for n in ref.grads:
        assert f32.grads[n].dtype == np.float32
        assert rel_error(f32.grads[n], ref.grads[n]) < 1e-5, n
