"""Float64 gradients of the layer under every routing variant against central finite differences
(tests/gradcheck.py, the same bound as the original routing). Routing parameters included:
the router, the noise weights of noisy top-K and the shared-expert gate."""
import numpy as np
import pytest

import pymoe
from helpers import FD_RTOL, check_layer_gradients, numerical_grad, randomize, rel_error

T, D, H, E = 12, 4, 5, 4

VARIANTS = {
    "sigmoid_normalized_scaled": dict(k=2, cf=0.75, score="sigmoid", normalize=True,
                                      scaling_factor=2.5),
    "expert_bias_groups": dict(k=2, cf=1.0, score="sigmoid", num_groups=2, topk_groups=1,
                               group_score_k=2, expert_bias=np.array([0.1, -0.2, 0.3, 0.0])),
    "groups_softmax": dict(k=2, cf=None, num_groups=2, topk_groups=1),
    "token_priority_probs_drop": dict(k=2, cf=0.5, priority="token", drop_policy="probs"),
    "renormalize_after_drop": dict(k=2, cf=0.5, renormalize_after_drop=True),
    "score_priority_renorm_probs": dict(k=3, cf=0.5, priority="score", drop_policy="probs",
                                        renormalize_after_drop=True, normalize=True),
    "capacity_floor": dict(k=2, cf=1.0, capacity_rule="floor"),
    "capacity_tutel": dict(k=2, cf=0.5, capacity_rule="tutel"),
    "capacity_fixed": dict(k=2, cf=None, capacity=3),
    "k_scaled_loss": dict(k=2, cf=1.0, load_balancing="k_scaled"),
    "sequence_loss_sigmoid": dict(k=2, cf=1.0, score="sigmoid", load_balancing="sequence",
                                  sequence_length=4),
    "expert_choice": dict(k=1, cf=1.0, selection="experts"),
    "expert_choice_sigmoid": dict(k=2, cf=1.0, selection="experts", score="sigmoid",
                                  normalize=True),
    "sinkhorn": dict(k=2, cf=1.0, selection="sinkhorn"),
    "shared_experts": dict(k=2, cf=1.0, num_shared_experts=2),
    "shared_experts_gated": dict(k=1, cf=1.0, num_shared_experts=1, shared_expert_gate=True),
    "second_expert_threshold": dict(k=2, cf=1.0, normalize=True, second_expert_policy="threshold"),
}
RANDOM_VARIANTS = {
    "random_priority": dict(k=2, cf=0.5, priority="random"),
    "second_expert_random": dict(k=2, cf=1.0, second_expert_policy="random"),
    "noisy_topk": dict(k=2, cf=1.0, normalize=True, router_noise="noisy_topk",
                       load_loss_coef=0.5),
    "noisy_topk_drops": dict(k=1, cf=0.5, router_noise="noisy_topk", load_loss_coef=0.3,
                             priority="token"),
}


def make_layer(kw, formulation="indexed", backend="numpy"):
    kw = dict(kw)
    k, cf = kw.pop("k"), kw.pop("cf")
    layer = pymoe.MoELayer(D, H, E, k, cf, aux_loss_coef=0.3, z_loss_coef=0.05,
                           formulation=formulation, backend=backend, dtype=np.float64, seed=0,
                           **kw)
    randomize(layer, seed=11)
    return layer


@pytest.mark.parametrize("formulation", ["indexed", "dense"])
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_gradients(name, formulation):
    layer = make_layer(VARIANTS[name], formulation)
    rng = np.random.default_rng(5)
    x, dy = rng.normal(size=(T, D)), rng.normal(size=(T, D))
    errors = check_layer_gradients(layer, x, dy)
    assert max(errors.values()) <= FD_RTOL, errors


@pytest.mark.parametrize("name", sorted(RANDOM_VARIANTS))
def test_random_variant_gradients(name):
    layer = make_layer(RANDOM_VARIANTS[name])
    rng = np.random.default_rng(6)
    x, dy = rng.normal(size=(T, D)), rng.normal(size=(T, D))

    def same_noise():
        layer._noise_rng = np.random.default_rng(123)  # identical draws for every evaluation

    errors = check_layer_gradients(layer, x, dy, train=True, reset_noise=same_noise)
    assert max(errors.values()) <= FD_RTOL, errors
    if "noisy" in name:
        assert "w_noise" in errors and layer.load_loss > 0


def test_variants_really_change_routing():
    """Each variant routes differently from the default on the gradient-test input, so the
    gradient tests above exercise it (a variant silently ignored would still pass them)."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(T, D))
    base = make_layer({"k": 2, "cf": 1.0})
    base(x)
    for name, kw in {**VARIANTS, **RANDOM_VARIANTS}.items():
        layer = make_layer(kw)
        y = layer.forward(x, train=True)
        r = layer.routing
        same = (r.expert_index.shape == base.routing.expert_index.shape
                and np.array_equal(r.position, base.routing.position)
                and np.allclose(r.gate, base.routing.gate)
                and np.allclose(y, base(x))
                and layer.aux_loss == base.aux_loss)
        assert not same, name


@pytest.mark.parametrize("kw", [
    dict(score="sigmoid", normalize=True, scaling_factor=2.0, renormalize_after_drop=True),
    dict(score="sigmoid", load_balancing="sequence", sequence_length=3),
    dict(drop_policy="probs", priority="token", load_balancing="k_scaled"),
    dict(selection="experts", score="sigmoid"),
])
def test_route_backward_variants(kw):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(9, 5)) * 2
    K = 5 if kw.get("selection") == "experts" else 2
    dgate = rng.normal(size=(9, K))

    def objective():
        r = pymoe.route(logits, 2, 0.6, **kw)
        return float(np.sum(r.gate * dgate)) + 0.7 * r.aux_loss + 0.2 * r.z_loss

    r = pymoe.route(logits, 2, 0.6, **kw)
    assert r.dropped_fraction > 0
    got = pymoe.route_backward(r, dgate, aux_loss_coef=0.7, z_loss_coef=0.2)
    assert rel_error(got, numerical_grad(objective, logits)) <= FD_RTOL
