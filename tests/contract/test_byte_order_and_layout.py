"""Byte order and memory layout never change a result: big-endian and long-long inputs are read
as their values, and every layout gives the same bits (regressions: each test failed before its
fix)."""
from __future__ import annotations

import copy

import numpy as np
import pytest

import pymoe
from helpers import assert_same_bits, backend_by_name
from helpers import small_layer as layer
from pymoe import get_backend


# ------------------------------------------------------------------ byte order
@pytest.mark.parametrize("be", ["numpy", "c"])
@pytest.mark.parametrize("order", [">f8", ">f4"])
def test_big_endian_floats_are_read_as_their_values(be, order, request):
    backend = backend_by_name(be, request)
    x = np.ones((1, 2), order)
    w = np.full((1, 1), 2.0, order)
    out = backend.dispatch(x, [[0]], 1, weight=w)
    np.testing.assert_array_equal(out, [[[2.0, 2.0]]])
    eo = np.arange(1.0, 5.0).reshape(2, 1, 2).astype(order)  # [E=2, C=1, D=2]
    idx, pos = np.array([[1]]), np.array([[0]])
    np.testing.assert_array_equal(backend.combine(eo, idx, pos, w), [[6.0, 8.0]])
    dy = np.full((1, 2), 0.5, order)
    np.testing.assert_array_equal(backend.gate_grad(dy, eo, idx, pos), [[3.5]])


def test_route_and_layer_take_big_endian_inputs():
    L = np.random.default_rng(0).normal(size=(9, 5))
    a, b = pymoe.route(L, 2, 1.0), pymoe.route(L.astype(">f8"), 2, 1.0)
    assert_same_bits(a.gate, b.gate)
    assert a.aux_loss == b.aux_loss
    x = np.random.default_rng(1).normal(size=(7, 6)).astype(np.float32)
    m = layer()
    assert_same_bits(m.forward(x), m.forward(x.astype(">f4")))


@pytest.mark.parametrize("be", ["numpy", "c"])
def test_longlong_and_big_endian_index_arrays(be, request):
    backend = backend_by_name(be, request)
    idx = np.array([[0, 1], [1, 0], [0, 1]])
    want_pos, want_owner, _ = get_backend("numpy").assign_slots(idx, None, 2, 2)
    for kind in (np.longlong, ">i8", np.int32):
        pos, owner, _ = backend.assign_slots(idx.astype(kind), None, 2, 2)
        np.testing.assert_array_equal(pos, want_pos)
        np.testing.assert_array_equal(owner, want_owner)
        x = np.arange(6.0).reshape(3, 2)
        np.testing.assert_array_equal(backend.dispatch(x, want_owner.astype(kind), 2),
                                      get_backend("numpy").dispatch(x, want_owner, 2))


# ------------------------------------------------------------------ layout
def test_route_bits_do_not_depend_on_layout():
    # The case: F order summed the softmax in another order; the top-1 probabilities
    # then differed by one ulp and the score-priority tie went the other way.
    L = np.float32([[-1.5, 2, -.5, 0, 1.5, 1, 1, 1], [-1.5, 2, 0, 1, 1, 1.5, 1, -.5]])
    rng = np.random.default_rng(5)
    big = rng.normal(size=(33, 7)).astype(np.float32)
    for logits in (L, big):
        want = pymoe.route(logits, 2, 0.5, priority="score")
        wide = np.zeros((logits.shape[0], 2 * logits.shape[1]), np.float32)
        wide[:, ::2] = logits
        for other in (np.asfortranarray(logits), wide[:, ::2], logits[::-1][::-1],
                      np.asfortranarray(logits.T).T.copy(order="F")):
            got = pymoe.route(other, 2, 0.5, priority="score")
            for field in ("probs", "gate", "position", "token_order", "expert_index"):
                assert_same_bits(getattr(got, field), getattr(want, field))
            assert got.aux_loss == want.aux_loss and got.z_loss == want.z_loss
    # The two rows are permutations of each other, so their top-1 probabilities are equal in exact
    # arithmetic and NumPy's exp (its SIMD loop differs by CPU and version) decides who wins the one
    # slot; the contract is that the layout does not: the same winner as the C-order route.
    c_order = pymoe.route(L, 1, .5, priority="score")
    top1 = c_order.probs.max(axis=1)
    winner = [[0], [-1]] if top1[0] >= top1[1] else [[-1], [0]]
    assert pymoe.route(np.asfortranarray(L), 1, .5, priority="score").position.tolist() == \
        c_order.position.tolist() == winner


@pytest.mark.parametrize("formulation", ["indexed", "dense"])
def test_layer_bits_do_not_depend_on_layout(formulation):
    x = np.random.default_rng(2).normal(size=(11, 6)).astype(np.float32)
    dy = np.random.default_rng(3).normal(size=(11, 6)).astype(np.float32)
    m = layer(formulation=formulation)
    y, dx = m.forward(x), m.backward(dy)
    grads = copy.deepcopy(m.grads)
    for xf, dyf in ((np.asfortranarray(x), np.asfortranarray(dy)),
                    (np.repeat(x, 2, axis=1)[:, ::2], dy[::-1][::-1])):
        assert_same_bits(m.forward(xf), y)
        assert_same_bits(m.backward(dyf), dx)
        for name, g in grads.items():
            assert_same_bits(m.grads[name], g)
