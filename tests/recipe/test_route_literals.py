"""Tiny routing cases written as literals that a reader can check by hand."""
import math

import numpy as np
import pytest

import pymoe


def test_ties_go_to_the_lower_expert_index():
    logits = np.array([[1.0, 1.0, 0.0],   # experts 0 and 1 tie for first
                       [0.0, 2.0, 2.0],   # experts 1 and 2 tie
                       [5.0, 5.0, 5.0]])  # everything ties
    r = pymoe.route(logits, k=2, capacity_factor=None)
    np.testing.assert_array_equal(r.expert_index, [[0, 1], [1, 2], [0, 1]])


def test_capacity_one_keeps_only_the_first_token_of_each_expert():
    # k=1, token choices: expert 0, 0, 1, 0; C = ceil(1 * 4 * 0.5 / 2) = 1.
    logits = np.array([[2.0, 0.0], [3.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    r = pymoe.route(logits, k=1, capacity_factor=0.5)
    assert r.capacity == 1
    np.testing.assert_array_equal(r.expert_index[:, 0], [0, 0, 1, 0])
    np.testing.assert_array_equal(r.position[:, 0], [0, -1, 0, -1])
    np.testing.assert_array_equal(r.kept[:, 0], [True, False, True, False])
    np.testing.assert_array_equal(r.expert_load, [3, 1])
    np.testing.assert_array_equal(r.expert_load_kept, [1, 1])
    assert r.dropped_fraction == 0.5
    assert r.gate[1, 0] == 0 and r.gate[3, 0] == 0
    np.testing.assert_array_equal(r.slot_owner, [[0], [2]])
    # dispatch mask: token 0 -> (expert 0, slot 0), token 2 -> (expert 1, slot 0), others nowhere
    want = np.zeros((4, 2, 1), bool)
    want[0, 0, 0] = want[2, 1, 0] = True
    np.testing.assert_array_equal(r.dispatch_mask, want)


def test_every_token_on_one_expert():
    logits = np.tile([0.0, 0.0, 3.0, 0.0], (4, 1))  # all 4 tokens pick expert 2
    r = pymoe.route(logits, k=1, capacity_factor=1.0)  # C = ceil(4/4) = 1
    assert r.capacity == 1
    np.testing.assert_array_equal(r.expert_load, [0, 0, 4, 0])
    np.testing.assert_array_equal(r.position[:, 0], [0, -1, -1, -1])
    assert r.dropped_fraction == 0.75 and r.tokens_dropped_fraction == 0.75
    p2 = math.exp(3) / (math.exp(3) + 3)
    # aux = E * f_2 * P_2 = 4 * 1 * p2, far from the balanced value 1
    assert r.aux_loss == pytest.approx(4 * p2, rel=1e-6)


# token 0 -> [0, 1], token 1 -> [1, 0], token 2 -> [0, 2]; C = ceil(2 * 3 * 1.0 / 3) = 2.
# Top-1 probabilities: t1 0.84 > t2 0.77 > t0 0.67 (used by the batch-prioritised case).
K2_LOGITS = np.array([[2.0, 1.0, 0.0], [1.0, 3.0, 0.0], [2.5, 0.0, 1.0]])


def test_k2_choice_major_ordering():
    r = pymoe.route(K2_LOGITS, k=2, capacity_factor=1.0)
    np.testing.assert_array_equal(r.expert_index, [[0, 1], [1, 0], [0, 2]])
    assert r.capacity == 2
    # First choices claim slots first: t0->e0 slot 0, t1->e1 slot 0, t2->e0 slot 1.
    # Then second choices: t0->e1 slot 1, t1->e0 would be slot 2 >= C: dropped; t2->e2 slot 0.
    np.testing.assert_array_equal(r.position, [[0, 1], [0, -1], [1, 0]])
    # Token-major order (MegaBlocks) would have given t1's second choice slot 1 of expert 0 and
    # dropped t2's *first* choice instead; choice-major protects every first choice.
    np.testing.assert_array_equal(r.slot_owner, [[0, 4], [2, 1], [5, -1]])  # t*K + j


def test_k2_case_under_batch_prioritized_routing():
    # The same case, tokens served by top-1 probability: order t1, t2, t0 at every choice level.
    # First choices: t1->e1 slot 0, t2->e0 slot 0, t0->e0 slot 1. Second choices: t1->e0 would be
    # slot 2: dropped; t2->e2 slot 0; t0->e1 slot 1. The same pair drops, the slots move.
    r = pymoe.route(K2_LOGITS, k=2, capacity_factor=1.0, priority="score")
    np.testing.assert_array_equal(r.token_order, [1, 2, 0])
    np.testing.assert_array_equal(r.position, [[1, 1], [0, -1], [0, 0]])
    np.testing.assert_array_equal(r.slot_owner, [[4, 0], [2, 1], [5, -1]])


def test_batch_prioritized_routing_changes_who_is_dropped():
    # Every token's first choice is expert 0; C = ceil(2 * 3 * 0.5 / 3) = 1.
    # Top-1 probabilities rise with the token index, so score priority serves token 2 first.
    logits = np.array([[1.0, 0.5, 0.0], [2.0, 0.0, 0.5], [3.0, 1.0, 0.0]])
    choice = pymoe.route(logits, k=2, capacity_factor=0.5, priority="choice")
    score = pymoe.route(logits, k=2, capacity_factor=0.5, priority="score")
    np.testing.assert_array_equal(choice.expert_index, [[0, 1], [0, 2], [0, 1]])
    assert choice.capacity == score.capacity == 1
    np.testing.assert_array_equal(choice.token_order, [0, 1, 2])
    np.testing.assert_array_equal(score.token_order, [2, 1, 0])
    # choice: t0 keeps both, t1 keeps its 2nd (expert 2), t2 loses both.
    np.testing.assert_array_equal(choice.position, [[0, 0], [-1, 0], [-1, -1]])
    # score: t2 keeps both, t1 keeps its 2nd, t0 loses both.
    np.testing.assert_array_equal(score.position, [[-1, -1], [-1, 0], [0, 0]])
    assert choice.tokens_dropped_fraction == score.tokens_dropped_fraction == pytest.approx(1 / 3)


def test_dropless_capacity_is_the_largest_load():
    logits = np.array([[3.0, 0.0, 0.0], [3.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    r = pymoe.route(logits, k=1, capacity_factor=None)
    assert r.capacity == 3
    assert r.dropped_fraction == 0.0
    np.testing.assert_array_equal(r.position[:, 0], [0, 1, 2, 0])
    r = pymoe.route(logits, k=1, capacity_factor=None, min_capacity=4)
    assert r.capacity == 4  # min_capacity raises C, T = 4 caps it


def test_capacity_formula_rounds_up_includes_k_and_clips():
    logits = np.zeros((10, 4))
    assert pymoe.route(logits, 1, 1.0).capacity == 3  # ceil(10 / 4)
    assert pymoe.route(logits, 2, 1.0).capacity == 5  # ceil(2 * 10 / 4)
    assert pymoe.route(logits, 2, 1.25).capacity == 7  # ceil(6.25)
    assert pymoe.route(logits, 1, 0.01).capacity == 1  # ceil(0.025)
    assert pymoe.route(logits, 1, 0.01, min_capacity=4).capacity == 4
    assert pymoe.route(logits, 2, 100.0).capacity == 10  # never more than T
    assert pymoe.route(logits, 2, 1e308).capacity == 10  # huge factors do not overflow


def test_capacity_is_exact_for_decimal_factors():
    # 100 * 1.1 = 110.00000000000001 in floats, which would round C up to 12; C is 11.
    assert pymoe.route(np.zeros((100, 10)), 1, 1.1).capacity == 11
    assert pymoe.route(np.zeros((30, 7)), 2, 0.7).capacity == 6  # 2*30*0.7/7 = 6 exactly


def test_dropped_token_outputs_zero():
    layer = pymoe.MoELayer(3, 4, 2, 1, capacity_factor=0.5, dtype=np.float64, seed=3)
    layer.params["b2"][:] = 1.0  # an expert would output at least something non-zero
    x = np.ones((4, 3))  # identical tokens: all pick the same expert; C = 1
    y = layer.forward(x)
    kept = layer.routing.kept[:, 0]
    assert kept.sum() == 1
    np.testing.assert_array_equal(y[~kept], 0.0)
    assert np.all(y[kept] != 0)


def test_empty_input_gives_empty_results():
    r = pymoe.route(np.zeros((0, 4)), k=2)
    assert r.expert_index.shape == r.position.shape == r.gate.shape == (0, 2)
    assert r.capacity == 0 and r.dispatch_mask.shape == (0, 4, 0)
    assert r.dropped_fraction == 0.0 and r.aux_loss == 0.0 and r.z_loss == 0.0
    layer = pymoe.MoELayer(3, 4, 4, 2)
    y = layer.forward(np.zeros((0, 3), np.float32))
    assert y.shape == (0, 3)
    dx = layer.backward(np.zeros((0, 3), np.float32))
    assert dx.shape == (0, 3)
    assert all(np.all(g == 0) for g in layer.grads.values())


def test_gate_underflow_does_not_drop_a_kept_token():
    # Token 0's second choice has probability exp(-800) / ... = 0.0 in float64: the gate is 0,
    # yet the pair is kept and must sit in the dispatch mask.
    logits = np.array([[0.0, -800.0, -900.0]])
    r = pymoe.route(logits, k=2, capacity_factor=None)
    assert r.gate[0, 1] == 0.0 and r.kept[0, 1]
    assert r.dispatch_mask[0, 1, 0]
    assert r.combine_weights[0, 1, 0] == 0.0
