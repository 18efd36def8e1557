"""pymoe.losses.GlobalLoadBalance: the global-batch load-balancing loss (arXiv 2501.11873).

Literal cases a reader checks by hand, the identities that define it (one micro-batch = the
Switch loss; any split of the same tokens gives the same f), its gradient against central
differences in float64, and its argument checks. Megatron's value is in
tests/variants/test_crosscheck_megatron_global.py, the MPI Allreduce in
tests/parallel/test_global_balance.py.
"""
from __future__ import annotations

import numpy as np
import pytest

import pymoe
from helpers import FD_RTOL, numerical_grad, rel_error
from pymoe.losses import GlobalLoadBalance, load_balancing_loss


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_literal_two_micro_batches():
    """E = 2, K = 1. Micro-batch 1: 2 tokens both on expert 0; micro-batch 2: 2 tokens, one on
    each. Global f = (3/4, 1/4). Batch 2's P = mean of its softmax rows; loss = 2 (3/4 P_0 +
    1/4 P_1)."""
    g = GlobalLoadBalance(2, 1)
    r1 = pymoe.route(np.array([[2.0, 0.0], [1.0, 0.0]]), 1, None)
    r2 = pymoe.route(np.array([[3.0, 0.0], [0.0, 1.0]]), 1, None)
    g.update(r1)
    g.update(r2)
    assert g.tokens_per_expert.tolist() == [3, 1] and g.num_tokens == 4 and g.micro_batches == 2
    np.testing.assert_array_equal(g.fraction, [0.75, 0.25])
    P = r2.probs.mean(axis=0)
    assert g.loss(r2) == pytest.approx(2 * (0.75 * P[0] + 0.25 * P[1]), rel=1e-15)
    g.reset()
    assert g.tokens_per_expert.tolist() == [0, 0] and g.num_tokens == 0 and g.loss(r2) == 0.0


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_one_micro_batch_is_the_switch_loss(score):
    logits = _rng(1).normal(size=(24, 6))
    r = pymoe.route(logits, 2, None, score=score)
    g = GlobalLoadBalance(6, 2)
    g.update(r)
    assert g.loss(r) == pytest.approx(r.aux_loss, rel=1e-14)
    assert g.loss(r) == pytest.approx(load_balancing_loss(
        pymoe.losses.aux_loss_scores(r.probs, score), r.expert_index), rel=1e-14)


def test_split_does_not_change_f():
    """The same 30 tokens in micro-batches of 30, of 10 + 20 and of 7 + 11 + 12: the same global
    counts and the same f (pymoe weights micro-batches by their tokens)."""
    logits = _rng(2).normal(size=(30, 5))
    whole = pymoe.route(logits, 2, None)
    for cuts in ([30], [10, 30], [7, 18, 30]):
        g, lo = GlobalLoadBalance(5, 2), 0
        for hi in cuts:
            g.update(pymoe.route(logits[lo:hi], 2, None))
            lo = hi
        np.testing.assert_array_equal(g.tokens_per_expert, whole.expert_load)
        np.testing.assert_array_equal(g.fraction, whole.expert_load / 60)  # N_e / (K N)


def test_counts_are_before_dropping():
    """Capacity drops no count: f reads routing.expert_load, as routing.aux_loss does."""
    logits = np.tile([[3.0, 0.0, 0.0]], (6, 1))
    r = pymoe.route(logits, 1, 0.5)
    assert not r.kept.all()
    g = GlobalLoadBalance(3, 1)
    g.update(r)
    assert g.tokens_per_expert.tolist() == [6, 0, 0]


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_gradient_against_central_differences(score):
    """d (coef * loss) / d logits of the current micro-batch, the counts held (f is piecewise
    constant: the same choices at +-eps, checked), float64, FD_RTOL."""
    rng = _rng(3)
    g = GlobalLoadBalance(5, 2)
    for _ in range(2):
        g.update(pymoe.route(rng.normal(size=(9, 5)), 2, 1.0, score=score))
    logits = rng.normal(size=(8, 5))
    r = pymoe.route(logits, 2, 1.0, score=score)
    g.update(r)
    coef = 0.3
    got = g.loss_backward(r, coef)
    assert got.shape == logits.shape and got.dtype == np.float64
    num = numerical_grad(lambda: coef * g.loss(pymoe.route(logits, 2, 1.0, score=score)), logits)
    assert rel_error(got, num) <= FD_RTOL
    np.testing.assert_array_equal(pymoe.route(logits, 2, 1.0, score=score).expert_index,
                                  r.expert_index)


def test_gradient_adds_to_route_backward_like_the_aux_term():
    """With one micro-batch, loss_backward(r, c) is route_backward's aux term of coefficient c
    (route_backward with dgate = 0), to round-off."""
    logits = _rng(4).normal(size=(12, 4))
    r = pymoe.route(logits, 2, None)
    g = GlobalLoadBalance(4, 2)
    g.update(r)
    ref = pymoe.route_backward(r, np.zeros((12, 2)), aux_loss_coef=0.7)
    np.testing.assert_allclose(g.loss_backward(r, 0.7), ref, rtol=1e-12, atol=1e-15)


def test_bad_arguments():
    with pytest.raises(TypeError, match="num_experts"):
        GlobalLoadBalance(4.0, 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k"):
        GlobalLoadBalance(4, 5)
    with pytest.raises(TypeError, match="comm"):
        GlobalLoadBalance(4, 2, comm="world")
    g = GlobalLoadBalance(4, 2)
    with pytest.raises(TypeError, match="routing"):
        g.update(np.zeros((3, 4)))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="routing: expected E=4, K=2"):
        g.update(pymoe.route(np.zeros((3, 4)), 1, None))
    r = pymoe.route(np.zeros((3, 4)), 2, None)
    with pytest.raises(ValueError, match="coef"):
        g.loss_backward(r, -1.0)


def test_moe_layer_takes_the_gradient():
    """MoELayer.backward(dy, router_dlogits=gb.loss_backward(layer.routing, c)) with aux_loss_coef
    0 equals the layer with aux_loss_coef c after one micro-batch (the global loss is then the
    local one), to round-off."""
    x = _rng(6).normal(size=(16, 8))
    dy = _rng(7).normal(size=(16, 8))
    ref = pymoe.MoELayer(8, 6, 4, 2, 1.0, aux_loss_coef=0.3, dtype=np.float64, seed=1)
    ref.forward(x)
    dx_ref = ref.backward(dy)
    layer = pymoe.MoELayer(8, 6, 4, 2, 1.0, aux_loss_coef=0.0, dtype=np.float64, seed=1)
    layer.forward(x)
    g = GlobalLoadBalance(4, 2)
    g.update(layer.routing)
    dx = layer.backward(dy, router_dlogits=g.loss_backward(layer.routing, 0.3))
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-12, atol=1e-14)
    for name in ref.grads:
        np.testing.assert_allclose(layer.grads[name], ref.grads[name], rtol=1e-12, atol=1e-14,
                                   err_msg=name)
    with pytest.raises(ValueError, match="router_dlogits"):
        layer.backward(dy, router_dlogits=np.zeros((3, 4)))
    grouped = pymoe.MoELayer(8, 6, 4, 2, 1.0, dtype=np.float64, seed=1, token_groups=2)
    grouped.forward(x)
    with pytest.raises(ValueError, match="router_dlogits: not supported with token_groups"):
        grouped.backward(dy, router_dlogits=np.zeros((16, 4)))
