"""ReLU routing (ReMoE, github:thu-ml/ReMoE): route(..., selection="relu"). Literal values computed
from the original's formulas (ReLURouter: probs = relu(logits), routing_map = probs > 0, the L1
regulariser = Megatron's switch_load_balancing_loss_func on the relu gates with topk = the target
K; training.py: sparsity 1 - routed / (T*E), the coefficient times 1.2 while sparsity < 1 - K/E,
else divided by 1.2), gradients against central differences in float64, refusals by name."""
import numpy as np
import pytest

import pymoe
from helpers import (
    FD_RTOL,
    check_layer_gradients,
    numerical_grad,
    padding_takes_nothing_on_both_backends,
    randomize,
    rel_error,
)
from pymoe.variants.relu_routing import (
    L1_COEF_INIT,
    L1_COEF_MULTIPLIER,
    relu_sparsity,
    update_l1_coef,
)

# Token 0: two positive logits (expert 3's 0.0 is not positive); token 1: none (no expert, y = 0);
# token 2: all four.
LOGITS = np.array([[1.0, -0.5, 0.5, 0.0],
                   [-1.0, -2.0, -0.1, -3.0],
                   [2.0, 1.0, 0.5, 0.25]])


@pytest.mark.parametrize("backend", ["numpy", "c"])
def test_literal(backend):
    """n_e (tokens routed to e) = (2, 1, 2, 1); relu sums per expert (3, 1, 1, 0.25); with T = 3,
    target k = 2: L1 = E * sum_e n_e/(T k) * S_e/T = 4 * (6 + 1 + 2 + 0.25) / 18 = 37/18, as the
    original's formula gives (2.0555555555555554 from it in float64 torch)."""
    r = pymoe.route(LOGITS, 2, None, selection="relu", backend=backend)
    np.testing.assert_array_equal(r.experts_per_token, [2, 0, 4])
    np.testing.assert_array_equal(r.expert_index[0, :2], [0, 2])
    np.testing.assert_array_equal(r.gate, [[1.0, 0.5, 0, 0], [0, 0, 0, 0], [2.0, 1.0, 0.5, 0.25]])
    np.testing.assert_array_equal(r.expert_load, [2, 1, 2, 1])
    assert r.aux_loss == pytest.approx(37 / 18, rel=1e-15)
    assert relu_sparsity(r.selected, 4) == 0.5  # 6 of 12 gates positive
    assert r.tokens_dropped_fraction == pytest.approx(1 / 3)  # token 1 has no expert


def test_l1_gradient_literal():
    """d L1 / d logits = E n_e / (T^2 k) where the logit is positive, else 0 (relu' = 0 at 0, as
    torch's): 4/18 * (2, 1, 2, 1) -> 4/9, 2/9; the original's autograd gives the same."""
    r = pymoe.route(LOGITS, 2, None, selection="relu")
    d = pymoe.route_backward(r, np.zeros((3, 4)), aux_loss_coef=1.0)
    want = np.array([[4 / 9, 0, 4 / 9, 0], [0, 0, 0, 0], [4 / 9, 2 / 9, 4 / 9, 2 / 9]])
    np.testing.assert_allclose(d, want, rtol=1e-15, atol=0)


def test_adaptive_coefficient():
    """From 1e-8: sparsity below the target 1 - 2/8 = 0.75 multiplies by 1.2; at or above it
    divides (the original's `<`); the exact target divides."""
    assert (L1_COEF_INIT, L1_COEF_MULTIPLIER) == (1e-8, 1.2)
    assert update_l1_coef(1e-8, 0.5, 2, 8) == pytest.approx(1.2e-8, rel=1e-15)
    assert update_l1_coef(1e-8, 0.8, 2, 8) == pytest.approx(1e-8 / 1.2, rel=1e-15)
    assert update_l1_coef(1e-8, 0.75, 2, 8) == pytest.approx(1e-8 / 1.2, rel=1e-15)
    assert update_l1_coef(1e-8, 0.5, 2, 4) == pytest.approx(1e-8 / 1.2, rel=1e-15)  # LOGITS'
    for kw, name in ((dict(coef=0.0), "coef"), (dict(sparsity=1.5), "sparsity"),
                     (dict(k=9), "k"), (dict(multiplier=-1.0), "multiplier")):
        args = {**dict(coef=1e-8, sparsity=0.5, k=2, num_experts=8), **kw}
        with pytest.raises(ValueError, match=name):
            update_l1_coef(**args)


def test_coefficient_steers_sparsity():
    """A few steps of the original's loop on a layer: a large coefficient (the regulariser
    dominating) pushes gates below 0 and the sparsity up, and update_l1_coef then lowers it."""
    layer = pymoe.MoELayer(4, 5, 4, 1, None, selection="relu", aux_loss_coef=1.0,
                           dtype=np.float64, backend="numpy")
    randomize(layer, seed=2)
    x = np.random.default_rng(0).normal(size=(32, 4))
    layer(x)
    start = relu_sparsity(layer.routing.selected, 4)
    for _ in range(30):  # gradient steps on the L1 term alone
        layer(x)
        layer.backward(np.zeros_like(x))
        for name in ("w_router", "b_router"):
            layer.params[name] -= 0.5 * layer.grads[name]
    layer(x)
    end = relu_sparsity(layer.routing.selected, 4)
    assert end > start
    assert update_l1_coef(1.0, end, 1, 4) == (1.0 / 1.2 if end >= 0.75 else 1.2)


@pytest.mark.parametrize("kw", [dict(), dict(renormalize_after_drop=True),
                                dict(priority="token", drop_policy="probs")])
def test_route_backward(kw):
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(10, 5)) * 2
    dgate = rng.normal(size=(10, 5))

    def objective():
        r = pymoe.route(logits, 2, 0.5, selection="relu", **kw)
        return float(np.sum(r.gate * dgate)) + 0.7 * r.aux_loss + 0.2 * r.z_loss

    r = pymoe.route(logits, 2, 0.5, selection="relu", **kw)
    assert r.dropped_fraction > 0 and len(set(r.experts_per_token.tolist())) > 2
    got = pymoe.route_backward(r, dgate, aux_loss_coef=0.7, z_loss_coef=0.2)
    assert rel_error(got, numerical_grad(objective, logits)) <= FD_RTOL


@pytest.mark.parametrize("formulation", ["indexed", "dense"])
@pytest.mark.parametrize("cf", [0.5, None])
def test_layer_gradients(formulation, cf):
    layer = pymoe.MoELayer(4, 5, 4, 2, cf, selection="relu", aux_loss_coef=0.3, z_loss_coef=0.05,
                           formulation=formulation, backend="numpy", dtype=np.float64)
    randomize(layer, seed=11)
    rng = np.random.default_rng(5)
    x, dy = rng.normal(size=(12, 4)), rng.normal(size=(12, 4))
    errors = check_layer_gradients(layer, x, dy)
    assert max(errors.values()) <= FD_RTOL, errors
    assert len(set(layer.routing.experts_per_token.tolist())) > 1


def test_padding_and_c_backend():
    padding_takes_nothing_on_both_backends(2, selection="relu")


@pytest.mark.parametrize("kw, name", [
    (dict(score="sigmoid"), "score"), (dict(normalize=True), "normalize"),
    (dict(load_balancing="first_choice"), "load_balancing"), (dict(top_p=0.5), "top_p"),
    (dict(num_groups=2, topk_groups=1), "num_groups"),
])
def test_refusals(kw, name):
    with pytest.raises(ValueError, match=name):
        pymoe.route(np.zeros((3, 4)), 2, 1.0, selection="relu", **kw)


def test_refusals_layer_and_replay():
    with pytest.raises(ValueError, match="token_groups"):
        pymoe.MoELayer(4, 5, 4, 2, selection="relu", token_groups=2)
    with pytest.raises(ValueError, match="replay"):
        pymoe.route(np.zeros((3, 4)), 2, 1.0, selection="relu",
                    replay=np.zeros((3, 2), int) + [0, 1])
