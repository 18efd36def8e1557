"""Every slot rule in C gives the NumPy reference's integers, bit for bit, for any thread count."""
import numpy as np
import pytest

import pymoe
from props import given, st
from pymoe.backend.numpy_backend import NumpyBackend
from pymoe.priority import pair_order

REF = NumpyBackend()


@st.composite
def ordered_problem(draw):
    T = draw(st.integers(0, 60))
    E = draw(st.integers(1, 8))
    K = draw(st.integers(1, E))
    C = draw(st.integers(0, T + 1))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    index = np.argsort(rng.random((T, E)), axis=1)[:, :K].astype(np.int64)
    order = rng.permutation(T * K).astype(np.int64)
    order = order[: draw(st.integers(0, T * K))]  # a subset: some pairs never compete
    score = rng.normal(size=(T, K))
    if draw(st.booleans()):
        score = np.round(score)  # many ties
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    return index, order, score.astype(dtype), E, C


@given(ordered_problem())
def test_assign_slots_ordered_matches_numpy(c_backend, case):
    index, order, _, E, C = case
    got_all = c_backend.assign_slots_ordered(index, order, E, C)
    want_all = REF.assign_slots_ordered(index, order, E, C)
    assert len(got_all) == len(want_all)  # (zip's strict= needs Python 3.10)
    for got, want in zip(got_all, want_all):
        np.testing.assert_array_equal(got, want)


@given(ordered_problem())
def test_keep_by_score_matches_numpy_for_any_thread_count(c_backend, case):
    index, order, score, E, C = case
    want = REF.keep_by_score(index, order, score, E, C)
    for n in (1, 2, 5):
        with c_backend.num_threads(n):
            np.testing.assert_array_equal(c_backend.keep_by_score(index, order, score, E, C), want)


RULES = [
    dict(priority="token"),
    dict(priority="score", drop_policy="probs"),
    dict(priority="token", drop_policy="probs"),
    dict(priority="random", drop_policy="probs"),
    dict(priority="random"),
    dict(selection="experts"),
    dict(second_expert_policy="threshold"),
    dict(drop_policy="probs", renormalize_after_drop=True),
]


@pytest.mark.parametrize("kw", RULES)
@pytest.mark.parametrize("tied", [False, True])
def test_layer_slot_rules_same_integers_in_c(c_backend, kw, tied):
    """MoELayer(backend='c') routes exactly like MoELayer(backend='numpy') under every rule."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 6))
    if tied:
        x = np.round(x)
    k = 2
    layers = [pymoe.MoELayer(6, 8, 4, k, 0.6 if "selection" not in kw else 0.5,
                             backend=b, dtype=np.float64, seed=2, **kw) for b in ("numpy", "c")]
    ys = [layer(x) for layer in layers]
    a, b = (layer.routing for layer in layers)
    np.testing.assert_array_equal(a.position, b.position)
    np.testing.assert_array_equal(a.slot_owner, b.slot_owner)
    np.testing.assert_array_equal(a.expert_load, b.expert_load)
    np.testing.assert_array_equal(ys[0], ys[1])
    assert a.dropped_fraction > 0


def test_c_rejects_a_bad_pair_order(c_backend):
    index = np.zeros((3, 2), np.int64)
    with pytest.raises(ValueError, match="order: expected distinct pair ids"):
        c_backend.assign_slots_ordered(index, np.array([0, 0]), 1, 2)
    with pytest.raises(ValueError, match=r"order: expected entries in \[0, 6\)"):
        c_backend.keep_by_score(index, np.array([6]), np.zeros((3, 2)), 1, 2)
    ffi = c_backend.ffi
    code = c_backend.lib.pymoe_assign_slots_ordered(
        ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL, ffi.new("int64_t[]", [0]), 1, 0, 0, 1, 0)
    assert code == c_backend.lib.PYMOE_ERR_PAIRS  # N = 1 > T*K = 0, caught before any write
    with pytest.raises(ValueError, match=r"C core assign_slots_ordered: order has an entry"):
        c_backend._check("assign_slots_ordered", code)


def test_pair_order_is_what_c_walks():
    np.testing.assert_array_equal(pair_order(np.array([2, 0, 1]), 2, "choice"), [4, 0, 2, 5, 1, 3])
    np.testing.assert_array_equal(pair_order(np.array([2, 0, 1]), 2, "token"), [4, 5, 0, 1, 2, 3])


ROUTE_VARIANTS = [
    dict(score="sigmoid", normalize=True, expert_bias=np.array([0.1, -0.2, 0.0, 0.3, 0.0])),
    dict(expert_bias=np.array([0.05, 0.0, -0.05, 0.0, 0.1])),
    dict(score="sigmoid", num_groups=5, topk_groups=2),
    dict(priority="token", drop_policy="probs", renormalize_after_drop=True),
    dict(priority="random", seed=4),
    dict(selection="experts"),
    dict(selection="sinkhorn"),
    dict(second_expert_policy="random", seed=2),
    dict(load_balancing="k_scaled", capacity_rule="tutel"),
]


@pytest.mark.parametrize("kw", ROUTE_VARIANTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_route_variants_same_integers_in_c(c_backend, kw, dtype):
    """route(backend='c') (C top-K and C slot rules) routes exactly like backend='numpy'."""
    logits = np.random.default_rng(3).normal(size=(60, 5)).astype(dtype)
    a = pymoe.route(logits, 2, 0.5, backend="numpy", **kw)
    b = pymoe.route(logits, 2, 0.5, backend="c", **kw)
    for name in ("expert_index", "position", "slot_owner", "expert_load", "kept"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    np.testing.assert_array_equal(a.gate, b.gate)
    assert b.aux_loss == pytest.approx(a.aux_loss, rel=1e-6)
    assert a.dropped_fraction > 0
