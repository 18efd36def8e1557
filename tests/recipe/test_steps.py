"""Each routing step on its own: the invariants its docstring states."""
import warnings

import numpy as np
import pytest

import pymoe
from pymoe.capacity import expert_capacity
from pymoe.priority import choice_major, expert_mask, priority_order
from pymoe.router import router_dtype, softmax
from pymoe.topk import gates, top_k


def test_softmax_is_stable_for_huge_logits():
    p = softmax(np.array([[1000.0, 1000.0, -1000.0], [-5e3, 0.0, 5e3]]))
    assert np.all(np.isfinite(p))
    np.testing.assert_allclose(p, [[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])


def test_softmax_rows_sum_to_one(rng):
    p = softmax(rng.normal(size=(50, 7)) * 10)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-14)
    assert np.all(p > 0)


def test_renormalised_gates_equal_softmax_over_the_selected_logits(rng):
    logits = rng.normal(size=(40, 8)) * 3
    idx = top_k(logits, 3)
    g = gates(softmax(logits), idx, normalize=True)
    np.testing.assert_allclose(g, softmax(np.take_along_axis(logits, idx, axis=1)), rtol=1e-13)
    np.testing.assert_allclose(g.sum(axis=1), 1.0, rtol=1e-14)


def test_raw_gates_are_the_full_softmax_probabilities(rng):
    logits = rng.normal(size=(10, 5))
    r = pymoe.route(logits, 2, capacity_factor=None)
    np.testing.assert_array_equal(r.gate, np.take_along_axis(r.probs, r.expert_index, axis=1))
    assert np.all(r.gate.sum(axis=1) < 1)


def test_top_k_is_best_first_and_distinct(rng):
    logits = rng.normal(size=(30, 6))
    idx = top_k(logits, 4)
    vals = np.take_along_axis(logits, idx, axis=1)
    assert np.all(np.diff(vals, axis=1) <= 0)
    assert all(len(set(row)) == 4 for row in idx.tolist())


def test_router_math_runs_in_at_least_float32():
    assert router_dtype(np.float16) == np.float32
    assert router_dtype(np.float32) == np.float32
    assert router_dtype(np.float64) == np.float64
    r = pymoe.route(np.array([[1.0, 2.0]], dtype=np.float16), 1)
    assert r.probs.dtype == np.float32 and r.router_logits.dtype == np.float32


def test_normalize_with_k1_warns_once_per_layer():
    with pytest.warns(UserWarning, match="k=1"):
        pymoe.route(np.zeros((2, 3)), 1, normalize=True)
    with pytest.warns(UserWarning, match="no gradient"):
        layer = pymoe.MoELayer(2, 3, 3, 1, normalize=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.forward(np.ones((2, 2), np.float32))  # forward does not warn again
        pymoe.route(np.zeros((2, 3)), 2, normalize=True)  # k=2 does not warn


def test_expert_mask_is_one_hot():
    m = expert_mask(np.array([[2, 0], [1, 2]]), 3)
    np.testing.assert_array_equal(m, [[[0, 0, 1], [1, 0, 0]], [[0, 1, 0], [0, 0, 1]]])


def test_choice_major_puts_all_first_choices_first():
    idx = np.array([[0, 1], [1, 2], [2, 0]])  # T=3, K=2
    rows = choice_major(expert_mask(idx, 3), np.arange(3)).argmax(axis=1)
    np.testing.assert_array_equal(rows, [0, 1, 2, 1, 2, 0])  # choice 0 of t0..t2, then choice 1
    rows = choice_major(expert_mask(idx, 3), np.array([2, 0, 1])).argmax(axis=1)
    np.testing.assert_array_equal(rows, [2, 0, 1, 0, 1, 2])


def test_score_priority_breaks_ties_by_token_index():
    probs = np.array([[0.5, 0.5], [0.9, 0.1], [0.5, 0.5], [0.1, 0.9]])
    np.testing.assert_array_equal(priority_order(probs, "score"), [1, 3, 0, 2])


@pytest.mark.parametrize("T,E,k,cf,minc,want", [
    (8, 4, 2, 1.25, 0, 5), (8, 4, 1, 1.0, 0, 2), (3, 8, 1, 1.0, 0, 1), (3, 8, 1, 1.0, 2, 2),
    (5, 2, 2, 4.0, 0, 5), (0, 4, 1, 1.0, 3, 0), (16, 4, 2, 0.25, 0, 2)])
def test_expert_capacity_table(T, E, k, cf, minc, want):
    assert expert_capacity(T, E, k, cf, minc) == want


def test_dropless_needs_the_load():
    with pytest.raises(ValueError, match="load"):
        expert_capacity(4, 2, 1, None)


def test_jitter_only_in_training_seeded_and_bounded():
    x = np.random.default_rng(0).normal(size=(64, 8))
    a = pymoe.MoELayer(8, 4, 4, 2, jitter_eps=0.2, dtype=np.float64, seed=7)
    b = pymoe.MoELayer(8, 4, 4, 2, jitter_eps=0.2, dtype=np.float64, seed=7)
    y_eval1, y_eval2 = a.forward(x), a.forward(x)
    np.testing.assert_array_equal(y_eval1, y_eval2)  # no noise outside training
    ya, yb = a.forward(x, train=True), b.forward(x, train=True)
    np.testing.assert_array_equal(ya, yb)  # same seed, same noise
    noise = a._cache.noise
    assert noise is not None and np.all(np.abs(noise - 1) <= 0.2) and noise.std() > 0.05
    np.testing.assert_array_equal(a._cache.x_router, x * noise)  # only the router's copy
    assert not np.array_equal(a.forward(x, train=True), ya)  # fresh noise each step


def test_drop_keeps_the_first_capacity_positions():
    """capacity.drop (step 9), by hand: C = 2 keeps positions 0 and 1, zeroes the rest's gates."""
    from pymoe.capacity import drop

    position = np.array([[0, 1], [2, 0], [1, 3]])
    gate = np.array([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5]])
    kept_position, kept_gate, kept = drop(position, gate, 2)
    np.testing.assert_array_equal(kept_position, [[0, 1], [-1, 0], [1, -1]])
    np.testing.assert_array_equal(kept_gate, [[0.6, 0.4], [0.0, 0.3], [0.5, 0.0]])
    np.testing.assert_array_equal(kept, kept_position >= 0)


def test_drop_is_routes_step_9():
    """route()'s positions are capacity.drop applied to position_in_expert's."""
    from pymoe.capacity import drop
    from pymoe.priority import position_in_expert

    logits = np.random.default_rng(7).normal(size=(40, 6))
    r = pymoe.route(logits, 2, 0.5)
    full = position_in_expert(r.expert_index, 6, r.token_order)
    np.testing.assert_array_equal(drop(full, r.gate_before_drop, r.capacity)[0], r.position)


def test_router_z_loss_by_hand_and_as_route_computes_it():
    """losses.router_z_loss = mean_t logsumexp(logits_t)^2: log(2)^2 for two equal logits."""
    from pymoe.losses import router_z_loss

    assert router_z_loss(np.zeros((3, 2))) == pytest.approx(np.log(2.0) ** 2, rel=1e-15)
    assert router_z_loss(np.zeros((0, 4))) == 0.0
    logits = np.random.default_rng(8).normal(size=(30, 5))
    assert router_z_loss(logits) == pytest.approx(pymoe.route(logits, 2).z_loss, rel=1e-13)


def test_relu_of_negative_zero_is_positive_zero():
    # IEEE leaves the sign of max(-0, +0) open and NumPy's answer varies by version and SIMD loop;
    # the expert epilogues fix it to +0 (NumPy and C alike), so their outputs agree bit for bit.
    from pymoe.experts import bias_relu, relu

    a = np.array([-0.0, 0.0, -1.0, 2.0], np.float32)
    out = np.empty_like(a)
    relu(a, out)
    assert not np.signbit(out).any() and out.tolist() == [0.0, 0.0, 0.0, 2.0]
    b = np.array([[-0.0, 3.0]])
    bias_relu(b, np.array([-0.0, -5.0]))
    assert not np.signbit(b).any() and b.tolist() == [[0.0, 0.0]]
