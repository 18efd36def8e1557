"""The C core against the NumPy reference: every operation, forward and backward."""
import os

import numpy as np
import pytest

import pymoe
from helpers import (
    DOWNSTREAM_RTOL,
    FD_RTOL,
    assert_dot_close,
    check_layer_gradients,
    randomize,
    rel_norm_error,
)
from props import given, st
from pymoe.backend.numpy_backend import NumpyBackend

REF = NumpyBackend()


@st.composite
def routed(draw):
    """A routing problem: sizes, dtype, priority, and the reference's routing of it."""
    T = draw(st.integers(0, 70))
    E = draw(st.integers(1, 9))
    K = draw(st.integers(1, E))
    D = draw(st.sampled_from([1, 3, 4, 7, 16, 33, 64, 130]))  # ragged and aligned widths
    cf = draw(st.one_of(st.none(), st.floats(0.05, 2.5)))
    priority = draw(st.sampled_from(["choice", "score"]))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(T, E))
    if draw(st.booleans()):  # many ties: everyone likes the same experts
        logits = np.round(logits)
    r = pymoe.route(logits, K, cf, priority=priority)
    x = rng.normal(size=(T, D)).astype(dtype)
    return r, x, rng


def _abs_dot(dy, expert_out, r):
    """sum_d |dy[t, d] * expert_out[e, p, d]| per kept pair (the dot-product error scale)."""
    return REF.gate_grad(np.abs(dy), np.abs(expert_out), r.expert_index, r.position)


@given(routed())
def test_assign_slots_matches_reference(c_backend, case):
    r, _, _ = case
    order = r.token_order if r.priority == "score" else None
    position, owner, load = c_backend.assign_slots(r.expert_index, order, r.num_experts,
                                                   r.capacity)
    np.testing.assert_array_equal(position, r.position)
    np.testing.assert_array_equal(owner, r.slot_owner)
    np.testing.assert_array_equal(load, r.expert_load)
    for got, want in zip(REF.assign_slots(r.expert_index, order, r.num_experts, r.capacity),
                         (position, owner, load)):
        np.testing.assert_array_equal(got, want)


@given(routed(), st.booleans())
def test_dispatch_and_combine_are_bitwise_equal_to_numpy(c_backend, case, weighted):
    r, x, rng = case
    K, dt = r.k, x.dtype
    w = r.gate.astype(dt) if weighted else None
    for naive in (False, True):
        got = c_backend.dispatch(x, r.slot_owner, K, w, naive=naive)
        np.testing.assert_array_equal(got, REF.dispatch(x, r.slot_owner, K, w))
        out = rng.normal(size=got.shape).astype(dt)  # garbage in unused slots is never read
        got_y = c_backend.combine(out, r.expert_index, r.position, w, naive=naive)
        np.testing.assert_array_equal(got_y, REF.combine(out, r.expert_index, r.position, w))


@given(routed())
def test_backward_ops_match_numpy(c_backend, case):
    r, x, rng = case
    T, D = x.shape
    dt, K = x.dtype, r.k
    gate = r.gate.astype(dt)
    out = rng.normal(size=(r.num_experts, r.capacity, D)).astype(dt)
    dy = rng.normal(size=(T, D)).astype(dt)
    # combine backward: d_expert_out = dispatch(gate * dy), dgate = <dy, expert_out>
    np.testing.assert_array_equal(c_backend.dispatch(dy, r.slot_owner, K, gate),
                                  REF.dispatch(dy, r.slot_owner, K, gate))
    ref = REF.gate_grad(dy, out, r.expert_index, r.position)
    for naive in (False, True):
        got = c_backend.gate_grad(dy, out, r.expert_index, r.position, naive=naive)
        assert got.dtype == dt
        assert_dot_close(got, ref, _abs_dot(dy, out, r), D)
        assert np.all(got[~r.kept] == 0)
    # dispatch backward: dx = combine with unit weights
    d_in = rng.normal(size=out.shape).astype(dt)
    np.testing.assert_array_equal(c_backend.combine(d_in, r.expert_index, r.position),
                                  REF.combine(d_in, r.expert_index, r.position))


@pytest.mark.parametrize("T,E,K,cf", [(0, 4, 2, 1.0), (9, 1, 1, 1.0), (9, 4, 4, 1.0),
                                      (9, 5, 2, 0.01), (12, 3, 3, None)])
def test_edge_sizes(c_backend, T, E, K, cf):
    """T=0, E=1, K=E, C=1 (cf tiny) and dropless."""
    rng = np.random.default_rng(T + E + K)
    r = pymoe.route(rng.normal(size=(T, E)), K, cf)
    if cf == 0.01:
        assert r.capacity == 1
    position, owner, _ = c_backend.assign_slots(r.expert_index, r.token_order, E, r.capacity)
    np.testing.assert_array_equal(position, r.position)
    x = rng.normal(size=(T, 5))
    np.testing.assert_array_equal(c_backend.dispatch(x, owner, K), REF.dispatch(x, owner, K))
    ein = REF.dispatch(x, owner, K)
    np.testing.assert_array_equal(c_backend.combine(ein, r.expert_index, position, r.gate),
                                  REF.combine(ein, r.expert_index, position, r.gate))


@pytest.mark.parametrize("K,D", [(10, 1100), (16, 513), (12, 7)])
def test_many_choices_take_the_plain_combine_loop(c_backend, K, D):
    """More than 8 kept choices per token (moe_ops.h, COMBINE_DIRECT = 8) fall back to the plain
    combine loop inside the tuned function; wide and narrow rows. Bitwise equal to NumPy."""
    rng = np.random.default_rng(K)
    T, E = 40, K + 2
    r = pymoe.route(rng.normal(size=(T, E)), K, None)  # dropless: every token keeps K > 8
    assert r.kept.all()
    for dt in (np.float32, np.float64):
        out = rng.normal(size=(E, r.capacity, D)).astype(dt)
        gate = r.gate.astype(dt)
        for w in (gate, None):
            for naive in (False, True):
                got = c_backend.combine(out, r.expert_index, r.position, w, naive=naive)
                np.testing.assert_array_equal(got, REF.combine(out, r.expert_index, r.position, w))


def test_everything_dropped(c_backend):
    """C = 0 drops every pair: empty slot map, zero expert buffers, zero outputs."""
    idx = np.array([[0, 1], [1, 0], [0, 1]])
    position, owner, load = c_backend.assign_slots(idx, None, 2, 0)
    assert owner.shape == (2, 0) and np.all(position == -1)
    np.testing.assert_array_equal(load, [3, 3])  # the load counts pairs before dropping
    # C = 1: first choices claim t0 -> e0 and t1 -> e1; every later pair finds its expert full.
    position, owner, load = c_backend.assign_slots(idx, None, 3, 1)
    np.testing.assert_array_equal(load, [3, 3, 0])
    np.testing.assert_array_equal(position, [[0, -1], [0, -1], [-1, -1]])
    np.testing.assert_array_equal(owner, [[0], [2], [-1]])  # t*K + j
    y = c_backend.combine(np.ones((2, 1, 4)), idx, np.full((3, 2), -1), np.ones((3, 2)))
    np.testing.assert_array_equal(y, np.zeros((3, 4)))
    g = c_backend.gate_grad(np.ones((3, 4)), np.ones((2, 1, 4)), idx, np.full((3, 2), -1))
    np.testing.assert_array_equal(g, np.zeros((3, 2)))


def test_one_and_two_threads_give_identical_bits(c_backend):
    if not c_backend.openmp:
        pytest.skip("built without OpenMP: there is only one thread")
    rng = np.random.default_rng(0)
    T, D, E, K = 3000, 257, 16, 2
    r = pymoe.route(rng.normal(size=(T, E)), K, 1.0)
    x, dy = (rng.normal(size=(T, D)).astype(np.float32) for _ in range(2))
    gate = r.gate.astype(np.float32)

    def run():
        ein = c_backend.dispatch(x, r.slot_owner, K, gate)
        y = c_backend.combine(ein, r.expert_index, r.position, gate)
        g = c_backend.gate_grad(dy, ein, r.expert_index, r.position)
        return ein, y, g

    with c_backend.num_threads(1):
        one = run()
    with c_backend.num_threads(2):
        two = run()
        assert c_backend.get_num_threads() == 2
    for a, b in zip(one, two):
        assert a.tobytes() == b.tobytes()


def test_out_buffers_are_checked_and_used(c_backend):
    rng = np.random.default_rng(1)
    r = pymoe.route(rng.normal(size=(20, 4)), 2, 1.0)
    x = rng.normal(size=(20, 8)).astype(np.float32)
    buf = np.full((4, r.capacity, 8), np.nan, np.float32)
    got = c_backend.dispatch(x, r.slot_owner, 2, out=buf)
    assert got is buf
    np.testing.assert_array_equal(buf, REF.dispatch(x, r.slot_owner, 2))
    with pytest.raises(ValueError, match=r"out: expected shape \[4, 10, 8\] and dtype float32"):
        c_backend.dispatch(x, r.slot_owner, 2, out=np.empty((4, 10, 8), np.float64))
    with pytest.raises(ValueError, match="out: expected a C-contiguous, writeable array"):
        c_backend.combine(buf, r.expert_index, r.position, out=np.empty((8, 20), np.float32).T)


# ---------------------------------------------------------------------- the layer on the C backend

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("priority", ["choice", "score"])
@pytest.mark.parametrize("activation", ["gelu", "relu"])  # relu: the C epilogues
def test_layer_c_equals_layer_numpy(c_backend, dtype, priority, activation):
    kw = dict(d_model=24, d_hidden=40, num_experts=6, k=2, capacity_factor=0.9,
              priority=priority, activation=activation, aux_loss_coef=0.1, z_loss_coef=0.01,
              dtype=dtype, seed=5)
    lc, ln = pymoe.MoELayer(backend="c", **kw), pymoe.MoELayer(backend="numpy", **kw)
    assert lc.backend.name == "c" and ln.backend.name == "numpy"
    rng = np.random.default_rng(2)
    x, dy = (rng.normal(size=(4, 50, 24)).astype(dtype) for _ in range(2))
    y_c, y_n = lc.forward(x), ln.forward(x)
    assert lc.routing.dropped_fraction > 0
    np.testing.assert_array_equal(lc.routing.position, ln.routing.position)
    np.testing.assert_array_equal(y_c, y_n)  # same routing, same data movement, same BLAS
    dx_c, dx_n = lc.backward(dy), ln.backward(dy)
    for name in ("w1", "b1", "w2", "b2"):  # no gate gradient involved: bitwise
        np.testing.assert_array_equal(lc.grads[name], ln.grads[name], err_msg=name)
    tol = DOWNSTREAM_RTOL[np.dtype(dtype)]
    assert rel_norm_error(dx_c, dx_n) <= tol
    for name in ("w_router", "b_router"):
        assert rel_norm_error(lc.grads[name], ln.grads[name]) <= tol, name


def test_layer_gradients_on_c_backend_match_finite_differences(c_backend):
    layer = pymoe.MoELayer(4, 6, 4, 2, 0.5, normalize=True, aux_loss_coef=0.3, z_loss_coef=0.05,
                           backend="c", dtype=np.float64, seed=0)
    randomize(layer, seed=11)
    rng = np.random.default_rng(5)
    x, dy = rng.normal(size=(12, 4)), rng.normal(size=(12, 4))
    errors = check_layer_gradients(layer, x, dy)
    assert layer.routing.dropped_fraction > 0
    assert max(errors.values()) <= FD_RTOL, errors


def test_auto_picks_c_and_reports_it(c_backend):
    assert pymoe.MoELayer(4, 4, 2, 1).backend.name == "c"
    info = pymoe.backends()["c"]
    assert info.available and "C core" in info.detail


def test_sanitizer_build_is_the_one_loaded(c_backend):
    """CI reruns the C tests on an ASan+UBSan build; make sure that build is really the one here."""
    if os.environ.get("PYMOE_EXPECT_SANITIZER") != "1":
        pytest.skip("not the sanitizer run (CI sets PYMOE_EXPECT_SANITIZER=1 for it)")
    assert "ASan+UBSan" in c_backend.build_config
