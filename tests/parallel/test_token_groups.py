"""MoELayer(token_groups=G): each block of T/G tokens routed on its own (the GShard group)."""
import numpy as np
import pytest

import pymoe
from helpers import check_group_gradients, randomize
from pymoe import token_groups as grouped


def _layer(G, **kw):
    kw = {"aux_loss_coef": 0.3, "z_loss_coef": 0.05, "dtype": np.float64, "seed": 0,
          "backend": "numpy", **kw}
    return pymoe.MoELayer(4, 5, 4, 2, kw.pop("cf", 0.75), token_groups=G, **kw)


@pytest.mark.parametrize("load_stats", ["local", "global"])
@pytest.mark.parametrize("G", [2, 3])
def test_group_gradients_match_finite_differences(G, load_stats):
    """Parameters: the gradient of J = (1/G) sum_g L_g; dx of block g: that of L_g = G dJ/dx_g."""
    layer = _layer(G, load_stats=load_stats)
    randomize(layer, seed=11)
    rng = np.random.default_rng(5)
    x, dy = rng.normal(size=(6 * G, 4)), rng.normal(size=(6 * G, 4))

    routings = check_group_gradients(layer, x, dy)
    assert len(routings) == G and any(r.dropped_fraction > 0 for r in routings)


def test_each_group_routes_alone_with_its_own_capacity():
    G, Tg = 3, 8
    layer = _layer(G, cf=1.0)
    x = np.random.default_rng(2).normal(size=(G * Tg, 4))
    y = layer.forward(x)
    one = _layer(1, cf=1.0)
    for g, r in enumerate(layer.routing):
        yg = one.forward(x[g * Tg:(g + 1) * Tg])
        assert r.capacity == one.routing.capacity == 4  # ceil(2 * 8 * 1.0 / 4)
        np.testing.assert_array_equal(r.position, one.routing.position)
        np.testing.assert_allclose(y[g * Tg:(g + 1) * Tg], yg, rtol=1e-12, atol=1e-12)
    assert layer.aux_loss == pytest.approx(np.mean([r.aux_loss for r in layer.routing]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("backend", ["numpy", "auto"])
def test_one_group_through_the_grouped_step_is_the_plain_layer(dtype, backend):
    """grouped.forward_groups / backward_groups with G = 1 give the plain layer's bits."""
    layer = _layer(1, dtype=dtype, backend=backend, load_stats="global")
    rng = np.random.default_rng(4)
    x, dy = rng.normal(size=(10, 4)).astype(dtype), rng.normal(size=(10, 4)).astype(dtype)
    y, dx = layer.forward(x), layer.backward(dy)
    ex = grouped.LocalExchange(1)
    ys, cache, aux, z = grouped.forward_groups(layer, [x], layer._expert_params(), ex, "global",
                                               False, {})
    dxs, grads = grouped.backward_groups(layer, cache, [dy], layer._expert_params(), {})
    np.testing.assert_array_equal(ys[0], y)
    np.testing.assert_array_equal(dxs[0], dx)
    for n, g in layer.grads.items():
        np.testing.assert_array_equal(grads[n], g)
    assert (aux, z) == (layer.aux_loss, layer.z_loss)


def test_pack_and_unpack_rows_are_inverse():
    rng = np.random.default_rng(0)
    loads = [np.array([2, 0, 3]), np.array([1, 1, 0])]
    blocks = [rng.normal(size=(3, 3, 2)), rng.normal(size=(3, 2, 2))]
    for b, n in zip(blocks, loads):
        for e in range(3):
            b[e, n[e]:] = 0
    packed, filled = grouped.pack_rows(blocks, loads)
    assert packed.shape == (3, 5, 2) and filled.tolist() == [3, 1, 3]
    np.testing.assert_array_equal(packed[0, :3], np.concatenate([blocks[0][0, :2],
                                                                 blocks[1][0, :1]]))
    for a, b in zip(grouped.unpack_rows(packed, loads, [3, 2]), blocks):
        np.testing.assert_array_equal(a, b)


def test_bad_token_groups():
    with pytest.raises(ValueError, match="token_groups"):
        pymoe.MoELayer(4, 5, 4, 2, token_groups=0)
    with pytest.raises(ValueError, match="indexed formulation only"):
        pymoe.MoELayer(4, 5, 4, 2, token_groups=2, formulation="dense")
    with pytest.raises(ValueError, match="load_stats"):
        pymoe.MoELayer(4, 5, 4, 2, load_stats="rank")
    layer = pymoe.MoELayer(4, 5, 4, 2, token_groups=3)
    with pytest.raises(ValueError, match="positive multiple of 3, got T = 10"):
        layer.forward(np.zeros((10, 4)))
    with pytest.raises(ValueError, match="positive multiple of 3, got T = 0"):
        layer.forward(np.zeros((0, 4)))


@pytest.mark.parametrize("gated", [False, True])
def test_shared_experts_in_token_groups_are_the_plain_layers(gated):
    """Shared experts are token-local: with dropless routing (capacity None, so groups route as
    the whole batch) G groups give the plain layer's y and dx, and its gradients divided by G
    (the mean objective of pymoe.token_groups; aux loss off, whose statistics are per group)."""
    kw = dict(num_shared_experts=2, shared_expert_gate=gated, dtype=np.float64, backend="numpy",
              aux_loss_coef=0.0, seed=5)
    plain = pymoe.MoELayer(6, 5, 4, 2, None, **kw)
    grouped = pymoe.MoELayer(6, 5, 4, 2, None, token_groups=3, **kw)
    rng = np.random.default_rng(0)
    x, dy = rng.normal(size=(12, 6)), rng.normal(size=(12, 6))
    np.testing.assert_allclose(grouped.forward(x), plain.forward(x), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(grouped.backward(dy), plain.backward(dy), rtol=1e-12, atol=1e-14)
    assert set(grouped.grads) == set(plain.grads) and "shared_w1" in grouped.grads
    for n, g in plain.grads.items():
        np.testing.assert_allclose(grouped.grads[n] * 3, g, rtol=1e-10, atol=1e-13, err_msg=n)
