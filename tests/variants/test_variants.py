"""Routing variants: one tiny literal case per step, checkable by hand."""

import numpy as np
import pytest

import pymoe
from pymoe.capacity import expert_capacity, keep_by_score
from pymoe.losses import balance_loss, load_balancing_loss
from pymoe.priority import pair_order
from pymoe.variants.group_limited import group_scores, limit_to_groups
from pymoe.variants.noisy import noise_thresholds
from pymoe.variants.scores import sigmoid, softmax_over_top_k
from pymoe.variants.sinkhorn import sinkhorn


def logit(p):
    return np.log(np.asarray(p, float) / (1 - np.asarray(p, float)))


# token 0 -> [0, 1], token 1 -> [1, 0], token 2 -> [0, 2] (as tests/recipe/test_route_literals.py)
K2_LOGITS = np.array([[2.0, 1.0, 0.0], [1.0, 3.0, 0.0], [2.5, 0.0, 1.0]])


def test_sigmoid_scores_renormalised_over_the_chosen_and_scaled():
    logits = logit([[0.5, 0.75, 0.25]])
    np.testing.assert_allclose(sigmoid(logits), [[0.5, 0.75, 0.25]])
    r = pymoe.route(logits, 2, None, score="sigmoid", normalize=True)
    np.testing.assert_array_equal(r.expert_index, [[1, 0]])
    np.testing.assert_allclose(r.gate, [[0.6, 0.4]])  # 0.75 / 1.25, 0.5 / 1.25
    r = pymoe.route(logits, 2, None, score="sigmoid", normalize=True, scaling_factor=2.5)
    np.testing.assert_allclose(r.gate, [[1.5, 1.0]])
    r = pymoe.route(logits, 2, None, score="sigmoid")  # raw sigmoid gates
    np.testing.assert_allclose(r.gate, [[0.75, 0.5]])


def test_sigmoid_is_stable_for_large_logits():
    s = sigmoid(np.array([[-800.0, 0.0, 800.0]]))
    np.testing.assert_array_equal(s, [[0.0, 0.5, 1.0]])


def test_softmax_over_the_top_k_logits_equals_normalize_true(rng):
    logits = rng.normal(size=(20, 6)) * 3
    r = pymoe.route(logits, 3, None, normalize=True)
    np.testing.assert_allclose(softmax_over_top_k(logits, r.expert_index), r.gate, rtol=1e-14)


def test_expert_bias_changes_the_choice_but_not_the_gate():
    logits = logit([[0.75, 0.5, 0.5]])
    r = pymoe.route(logits, 1, None, score="sigmoid", expert_bias=np.array([0.0, 0.0, 0.3]))
    np.testing.assert_array_equal(r.expert_index, [[2]])  # 0.5 + 0.3 > 0.75
    np.testing.assert_allclose(r.gate, [[0.5]])  # the unbiased score


def test_update_expert_bias_moves_towards_the_mean_load():
    bias = np.zeros(3)
    new = pymoe.update_expert_bias(bias, np.array([3, 1, 2]), 0.1)
    np.testing.assert_allclose(new, [-0.1, 0.1, 0.0])  # mean load 2
    np.testing.assert_array_equal(bias, 0.0)  # not modified in place


def test_group_limited_top_k_keeps_the_best_groups():
    s = np.array([[0.9, 0.1, 0.6, 0.6]])  # group 0 = experts 0-1, group 1 = experts 2-3
    np.testing.assert_allclose(group_scores(s, 2, 2), [[1.0, 1.2]])
    np.testing.assert_array_equal(limit_to_groups(s, 2, 1, 2), [[-np.inf, -np.inf, 0.6, 0.6]])
    logits = logit(s)
    r = pymoe.route(logits, 2, None, score="sigmoid", num_groups=2, topk_groups=1,
                    group_score_k=2)  # DeepSeek-V3's top-2 group score
    np.testing.assert_array_equal(r.expert_index, [[2, 3]])  # not expert 0, the best one
    r = pymoe.route(logits, 2, None, score="sigmoid", num_groups=2, topk_groups=1,
                    group_score_k=1)  # each group scored by its best expert: 0.9 > 0.6
    np.testing.assert_array_equal(r.expert_index, [[0, 1]])
    r = pymoe.route(logits, 1, None, score="sigmoid", num_groups=2, topk_groups=1)
    np.testing.assert_array_equal(r.expert_index, [[0]])  # default k // topk_groups = 1


@pytest.mark.parametrize("rule, cf, want", [
    ("k_ceil", 1.0, 5),     # ceil(2 * 10 * 1.0 / 4)
    ("floor", 1.0, 2),      # floor(10 * 1.0 / 4)
    ("round", 1.0, 2),      # round(2.5) = 2, halves to even
    ("round", 1.25, 3),     # round(3.125)
    ("tutel", 1.0, 6),      # 2 * floor(1.0 * ceil(10 / 4))
    ("tutel", 0.5, 2),      # 2 * floor(1.5)
])
def test_capacity_rules(rule, cf, want):
    assert expert_capacity(10, 4, 2, cf, rule=rule) == want
    assert pymoe.route(np.zeros((10, 4)), 2, cf, capacity_rule=rule).capacity == want


def test_fixed_capacity():
    assert pymoe.route(np.zeros((10, 4)), 2, capacity=3).capacity == 3
    assert pymoe.route(np.zeros((10, 4)), 2, capacity=30).capacity == 10  # never above T


def test_token_major_priority():
    assert list(pair_order(np.arange(3), 2, "token")) == [0, 1, 2, 3, 4, 5]
    assert list(pair_order(np.arange(3), 2, "choice")) == [0, 2, 4, 1, 3, 5]
    r = pymoe.route(K2_LOGITS, 2, capacity=1)
    np.testing.assert_array_equal(r.position, [[0, -1], [0, -1], [-1, 0]])
    r = pymoe.route(K2_LOGITS, 2, capacity=1, priority="token")
    # t0's two choices first (e0, e1), then t1's (e1, e0: both taken), then t2's (e0 taken, e2)
    np.testing.assert_array_equal(r.position, [[0, 0], [-1, -1], [-1, 0]])


def test_random_priority_is_seeded():
    logits = np.random.default_rng(0).normal(size=(30, 4))
    a = pymoe.route(logits, 2, 0.5, priority="random", seed=7)
    b = pymoe.route(logits, 2, 0.5, priority="random", seed=np.random.default_rng(7))
    np.testing.assert_array_equal(a.token_order, b.token_order)
    np.testing.assert_array_equal(a.position, b.position)
    assert sorted(a.token_order) == list(range(30))
    c = pymoe.route(logits, 2, 0.5, priority="random", seed=8)
    assert not np.array_equal(a.token_order, c.token_order)
    with pytest.raises(ValueError, match="seed: priority='random'"):
        pymoe.route(logits, 2, 0.5, priority="random")


def test_drop_policy_probs_keeps_the_best_scores():
    # four tokens all choose expert 0, scores rising with t; C = 2
    logits = np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0]])
    r = pymoe.route(logits, 1, capacity=2)
    np.testing.assert_array_equal(r.position[:, 0], [0, 1, -1, -1])  # first come
    r = pymoe.route(logits, 1, capacity=2, drop_policy="probs")
    np.testing.assert_array_equal(r.position[:, 0], [-1, -1, 0, 1])  # best two, slots in order
    np.testing.assert_array_equal(r.expert_load, [4, 0])


def test_keep_by_score_ties_go_to_the_earlier_pair():
    idx = np.zeros((4, 1), np.int64)
    keep = keep_by_score(idx, np.array([3, 2, 1, 0]), np.ones((4, 1)), 1, 2)
    np.testing.assert_array_equal(keep[:, 0], [False, False, True, True])


def test_renormalize_after_drop():
    r = pymoe.route(K2_LOGITS, 2, 1.0)  # t1's second choice is dropped (test_route_literals)
    assert r.gate[1, 0] < 1 and r.gate[1, 1] == 0
    r = pymoe.route(K2_LOGITS, 2, 1.0, renormalize_after_drop=True)
    np.testing.assert_allclose(r.gate[1], [1.0, 0.0])
    np.testing.assert_allclose(r.gate.sum(axis=1), 1.0)


def test_expert_choice_each_expert_takes_its_best_tokens():
    # probs of expert 0 fall with t; C = ceil(1 * 4 * 1.0 / 2) = 2
    logits = np.array([[3.0, 0.0], [2.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    r = pymoe.route(logits, 1, 1.0, selection="experts")
    assert r.capacity == 2 and r.k == 2  # K = E pairs per token
    np.testing.assert_array_equal(r.expert_index, [[0, 1], [0, 1], [0, 1], [1, 0]])
    # expert 0 takes t0, t1; expert 1 its best two, t3 (p1 = 0.73) and t2 (0.27), in token order
    np.testing.assert_array_equal(r.position, [[0, -1], [1, -1], [-1, 0], [1, -1]])
    np.testing.assert_array_equal(r.slot_owner, [[0, 2], [5, 6]])
    np.testing.assert_array_equal(r.expert_load_kept, [2, 2])
    p = pymoe.route(logits, 1, None).probs
    np.testing.assert_allclose(r.gate, np.where(r.kept, np.take_along_axis(p, r.expert_index, 1), 0))
    assert r.aux_loss == 0.0


def test_expert_choice_capacity_above_t_is_an_error():
    with pytest.raises(ValueError, match="capacity_factor: expert choice .* C must be <= T = 4"):
        pymoe.route(np.zeros((4, 2)), 2, 3.0, selection="experts")
    with pytest.raises(ValueError, match="capacity: expert choice"):
        pymoe.route(np.zeros((4, 2)), 1, capacity=5, selection="experts")


def test_sinkhorn_balances_a_crowded_expert():
    logits = np.array([[2.0, 0.0], [1.9, 0.0], [1.5, 0.0], [1.4, 0.0]])
    plain = pymoe.route(logits, 1, None)
    np.testing.assert_array_equal(plain.expert_index[:, 0], [0, 0, 0, 0])
    bal = sinkhorn(logits)
    np.testing.assert_allclose(bal.sum(axis=0), 0.5)  # columns carry equal mass
    r = pymoe.route(logits, 1, None, selection="sinkhorn")
    np.testing.assert_array_equal(r.expert_index[:, 0], [0, 0, 1, 1])  # smallest margins move
    np.testing.assert_allclose(r.gate[:, 0], plain.probs[np.arange(4), r.expert_index[:, 0]])


def test_second_expert_policies():
    r = pymoe.route(K2_LOGITS, 2, None, second_expert_policy="none")
    assert not r.kept[:, 1].any() and r.kept[:, 0].all()
    p = pymoe.route(K2_LOGITS, 2, None).probs
    g2 = [p[0, 1] / (p[0, 0] + p[0, 1]), p[1, 0] / (p[1, 0] + p[1, 1]),
          p[2, 2] / (p[2, 0] + p[2, 2])]  # 0.27, 0.12, 0.18
    r = pymoe.route(K2_LOGITS, 2, None, second_expert_policy="threshold",
                    second_expert_threshold=0.2)
    np.testing.assert_array_equal(r.kept[:, 1], np.array(g2) > 0.2)
    logits = np.random.default_rng(3).normal(size=(4000, 4))
    a = pymoe.route(logits, 2, None, second_expert_policy="random", seed=1)
    b = pymoe.route(logits, 2, None, second_expert_policy="random", seed=1)
    np.testing.assert_array_equal(a.kept, b.kept)
    pp = np.take_along_axis(a.probs, a.expert_index, 1)
    want = np.minimum(1, pp[:, 1] / pp.sum(axis=1) / 0.2).mean()
    assert abs(a.kept[:, 1].mean() - want) < 0.03  # kept with probability min(1, g2 / 0.2)


def test_load_balancing_variants():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(12, 4))
    r = pymoe.route(logits, 2, None)
    base = load_balancing_loss(r.probs, r.expert_index)
    assert r.aux_loss == base
    assert pymoe.route(logits, 2, None, load_balancing="k_scaled").aux_loss == \
        pytest.approx(2 * base)
    seq = pymoe.route(logits, 2, None, load_balancing="sequence", sequence_length=4).aux_loss
    want = np.mean([load_balancing_loss(r.probs[i:i + 4], r.expert_index[i:i + 4])
                    for i in (0, 4, 8)])
    assert seq == pytest.approx(want)
    assert balance_loss(r.probs, r.expert_index, "sequence", 12) == pytest.approx(base)


def test_sigmoid_aux_loss_uses_normalised_scores():
    logits = np.random.default_rng(4).normal(size=(6, 3))
    r = pymoe.route(logits, 1, None, score="sigmoid")
    q = r.probs / r.probs.sum(axis=1, keepdims=True)
    assert r.aux_loss == pytest.approx(load_balancing_loss(q, r.expert_index))


def test_noise_thresholds():
    # e0, e1 are the top-2: each compares with the 3rd best (e2); e2, e3 with the 2nd best (e1)
    np.testing.assert_array_equal(noise_thresholds(np.array([[3.0, 2.0, 1.0, 0.0]]), 2),
                                  [[2, 2, 1, 1]])


def test_shared_experts_add_to_the_routed_output():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 4))
    plain = pymoe.MoELayer(4, 5, 3, 1, 1.0, dtype=np.float64, seed=3)
    for gated in (False, True):
        layer = pymoe.MoELayer(4, 5, 3, 1, 1.0, num_shared_experts=2, shared_expert_gate=gated,
                               dtype=np.float64, seed=3)
        for n in ("w_router", "b_router", "w1", "b1", "w2", "b2"):
            layer.params[n] = plain.params[n]
        p = layer.params
        h = [np.maximum(x @ p["shared_w1"][s] + p["shared_b1"][s], 0) @ p["shared_w2"][s]
             + p["shared_b2"][s] for s in range(2)]
        g = 1 / (1 + np.exp(-(x @ p["w_shared_gate"]))) if gated else np.ones(6)
        np.testing.assert_allclose(layer(x), plain(x) + g[:, None] * (h[0] + h[1]), rtol=1e-12)


def test_defaults_are_unchanged():
    """The new keywords at their defaults give exactly the old routing."""
    logits = np.random.default_rng(5).normal(size=(20, 5))
    a = pymoe.route(logits, 2, 0.8)
    b = pymoe.route(logits, 2, 0.8, score="softmax", priority="choice", drop_policy="position",
                    selection="tokens", capacity_rule="k_ceil", load_balancing="switch")
    np.testing.assert_array_equal(a.position, b.position)
    np.testing.assert_array_equal(a.gate, b.gate)
    assert a.aux_loss == b.aux_loss


@pytest.mark.parametrize("kw, match", [
    (dict(num_groups=3, topk_groups=1), r"num_groups: must divide the number of experts E = 4"),
    (dict(num_groups=4, topk_groups=1), r"topk_groups: 1 groups of 1 experts hold fewer"),
    (dict(num_groups=2), r"topk_groups: required with num_groups"),
    (dict(topk_groups=1), r"num_groups: required"),
    (dict(expert_bias=np.zeros(3)), r"expert_bias: expected shape \[4\]"),
    (dict(score="tanh"), r"score: expected one of 'softmax', 'sigmoid'"),
    (dict(drop_policy="prob"), r"drop_policy: expected one of 'position', 'probs'"),
    (dict(selection="expert"), r"selection: expected one of"),
    (dict(capacity_rule="ceil"), r"capacity_rule: expected one of"),
    (dict(scaling_factor=0.0), r"scaling_factor: expected a finite value > 0"),
    (dict(load_balancing="sequence"), r"sequence_length: required"),
    (dict(second_expert_policy="random", seed=0), None),
    (dict(seed="x", priority="random"), r"seed: expected an int, a numpy Generator or None"),
])
def test_bad_variant_arguments(kw, match):
    logits = np.zeros((4, 4))
    if match is None:
        pymoe.route(logits, 2, **kw)
        with pytest.raises(ValueError, match=r"second_expert_policy: 'random' is GShard's top-2"):
            pymoe.route(logits, 3, **kw)
        return
    with pytest.raises((ValueError, TypeError), match=match):
        pymoe.route(logits, 2, **kw)


def test_bad_layer_variant_arguments():
    with pytest.raises(ValueError, match="router_noise: expected one of"):
        pymoe.MoELayer(4, 5, 4, 2, router_noise="gumbel")
    with pytest.raises(ValueError, match="router_noise: 'noisy_topk' needs k < E"):
        pymoe.MoELayer(4, 5, 2, 2, router_noise="noisy_topk")
    with pytest.raises(ValueError, match="jitter_eps: router_noise='jitter' needs"):
        pymoe.MoELayer(4, 5, 4, 2, router_noise="jitter")
    with pytest.raises(ValueError, match="num_shared_experts: expected an int"):
        pymoe.MoELayer(4, 5, 4, 2, num_shared_experts=-1)
    with pytest.raises(ValueError, match="shared_expert_gate: needs num_shared_experts"):
        pymoe.MoELayer(4, 5, 4, 2, shared_expert_gate=True)
    with pytest.raises(ValueError, match="num_groups: must divide"):
        pymoe.MoELayer(4, 5, 4, 2, num_groups=3, topk_groups=1)
    with pytest.raises(ValueError, match="jitter_eps: expected a finite value >= 0"):
        pymoe.MoELayer(4, 5, 4, 2, jitter_eps=-0.1)  # a noise scale below 0
    with pytest.raises(ValueError, match=r"expert_bias: expected shape \[4\]"):
        pymoe.MoELayer(4, 5, 4, 2, expert_bias=np.zeros(5))
    with pytest.raises(ValueError, match="token_groups: token groups and expert parallelism do "
                       "not support router_noise='noisy_topk'"):
        pymoe.MoELayer(4, 5, 4, 2, token_groups=2, router_noise="noisy_topk")
    with pytest.raises(ValueError, match="token_groups: .* do not support expert choice"):
        pymoe.MoELayer(4, 5, 4, 2, token_groups=2, selection="experts")


def test_expert_bias_updates_balance_a_skewed_router():
    """Aux-loss-free balancing: repeated update_expert_bias steps even out the load."""
    logits = np.random.default_rng(7).normal(size=(256, 8)) + np.linspace(1.5, 0, 8)
    bias = np.zeros(8)
    first = pymoe.route(logits, 2, None, score="sigmoid", expert_bias=bias).expert_load
    for _ in range(300):
        load = pymoe.route(logits, 2, None, score="sigmoid", expert_bias=bias).expert_load
        bias = pymoe.update_expert_bias(bias, load, 0.01)
    assert load.max() - load.min() < (first.max() - first.min()) / 4


@pytest.mark.parametrize("kw", [
    dict(priority="token"), dict(drop_policy="probs"), dict(selection="experts"),
    dict(selection="sinkhorn"), dict(score="sigmoid", num_groups=2, topk_groups=1,
                                     expert_bias=np.zeros(4)),
    dict(second_expert_policy="random", seed=1), dict(load_balancing="sequence", sequence_length=4),
    dict(renormalize_after_drop=True), dict(priority="random", seed=0),
])
def test_variants_route_zero_tokens(kw):
    r = pymoe.route(np.zeros((0, 4)), 2, 1.0, **kw)
    assert r.position.shape[0] == 0 and r.aux_loss == 0.0 and r.capacity == 0
    assert pymoe.route_backward(r, np.zeros((0, r.k)), 0.1, 0.1).shape == (0, 4)
