"""The routing and layer keywords issue 23 adds for HF families (docs/variants.md, "HF family
switches"): literal values a reader can check by hand, named errors, and float64 gradients
against central finite differences (the project's FD_RTOL)."""
import dataclasses

import numpy as np
import pytest

import pymoe
from helpers import FD_RTOL, check_layer_gradients, randomize
from pymoe.router import softcap
from pymoe.variants.input_norm import rms_norm


def test_expert_bias_on_logits_by_hand():
    """logits [2, 1, 0], bias [0, 0, 1.5], K = 1, sigmoid scores. On the scores: s + b =
    [0.88, 0.73, 0.5 + 1.5 = 2.0] picks expert 2. On the logits (kolibri1): l + b = [2, 1, 1.5]
    picks expert 0, gate sigmoid(2) = 0.8808 (the bias never enters a gate)."""
    L = np.array([[2.0, 1.0, 0.0]])
    b = np.array([0.0, 0.0, 1.5])
    on_scores = pymoe.route(L, 1, None, score="sigmoid", expert_bias=b)
    assert on_scores.expert_index.tolist() == [[2]]
    for backend in ("numpy", "c"):
        on_logits = pymoe.route(L, 1, None, score="sigmoid", expert_bias=b,
                                expert_bias_on="logits", backend=backend)
        assert on_logits.expert_index.tolist() == [[0]]
        assert on_logits.gate[0, 0] == pytest.approx(1 / (1 + np.exp(-2.0)), rel=1e-15)


def test_lp_norm_and_epsilon_by_hand():
    """Probabilities [0.3, 0.4, 0.2, 0.1], K = 2 choose 0.4 and 0.3. L2: ||(0.4, 0.3)|| = 0.5,
    gates [0.8, 0.6]; L1 + eps 0.3: 0.7 + 0.3 = 1, gates [0.4, 0.3]."""
    L = np.log([[0.3, 0.4, 0.2, 0.1]])
    l2 = pymoe.route(L, 2, None, normalize=True, normalize_p=2.0)
    np.testing.assert_allclose(l2.gate, [[0.8, 0.6]], rtol=1e-14)
    eps = pymoe.route(L, 2, None, normalize=True, normalize_eps=0.3)
    np.testing.assert_allclose(eps.gate, [[0.4, 0.3]], rtol=1e-14)
    plain = pymoe.route(L, 2, None, normalize=True, normalize_p=1.0)
    np.testing.assert_allclose(plain.gate, [[4 / 7, 3 / 7]], rtol=1e-14)


def test_softcap_by_hand():
    """c tanh(l / c) with c = 3: 0 -> 0, 3 -> 3 tanh(1) = 2.28478, -300 -> -3 (the cap)."""
    np.testing.assert_allclose(softcap(np.array([0.0, 3.0, -300.0]), 3.0),
                               [0.0, 3 * np.tanh(1.0), -3.0], rtol=1e-15)
    layer = pymoe.MoELayer(4, 3, 4, 2, capacity_factor=None, dtype=np.float64,
                           router_softcap=0.5, backend="numpy")
    layer.params["w_router"] *= 100  # logits far beyond the cap
    x = np.random.default_rng(0).standard_normal((5, 4))
    layer.forward(x)
    raw = x @ layer.params["w_router"]
    np.testing.assert_allclose(layer.routing.router_logits, 0.5 * np.tanh(raw / 0.5), rtol=1e-14)
    assert np.abs(layer.routing.router_logits).max() <= 0.5


def test_rms_norm_by_hand():
    """[3, 4]: mean square 12.5, so x / sqrt(12.5) = [0.84853, 1.13137]; weight 2, const 0.5."""
    y, _ = rms_norm(np.array([[3.0, 4.0]]), np.array([2.0, 2.0]), eps=0.0, const=0.5)
    np.testing.assert_allclose(y, [[3 / np.sqrt(12.5), 4 / np.sqrt(12.5)]], rtol=1e-15)


def test_gate_scale_multiplies_each_gate():
    """gate_scale [E]: the output is the unscaled layer's with each gate times scale[e]; with
    every scale 2 it is twice the output."""
    kw = dict(capacity_factor=None, dtype=np.float64, backend="numpy", seed=1)
    plain = pymoe.MoELayer(4, 3, 4, 2, **kw)
    scaled = pymoe.MoELayer(4, 3, 4, 2, gate_scale=True, **kw)
    scaled.params["gate_scale"][:] = 2.0
    x = np.random.default_rng(0).standard_normal((6, 4))
    np.testing.assert_allclose(scaled.forward(x), 2 * plain.forward(x), rtol=1e-14)


def test_jitter_experts_is_the_layer_on_jittered_x():
    """jitter_experts: forward(x, train=True) is the un-jittered layer on x * noise, the noise
    the layer drew (its noise generator replayed)."""
    kw = dict(capacity_factor=None, dtype=np.float64, backend="numpy", seed=2)
    layer = pymoe.MoELayer(4, 3, 4, 2, jitter_eps=0.2, jitter_experts=True,
                           num_shared_experts=1, **kw)
    x = np.random.default_rng(0).standard_normal((6, 4))
    y = layer.forward(x, train=True)
    noise = np.random.default_rng([2, 1]).uniform(0.8, 1.2, size=x.shape)  # the layer's draw
    np.testing.assert_array_equal(noise, layer._cache.noise)
    np.testing.assert_allclose(y, layer.forward(x * noise), rtol=1e-14)
    router_only = dataclasses.replace(layer.expert_options, jitter_experts=False)
    layer.expert_options = router_only
    layer._noise_rng = np.random.default_rng([2, 1])
    assert not np.allclose(layer.forward(x, train=True), y)


def test_modality_sets_route_inside_each_set():
    """modality_sets=2, E = 4: experts 0-1 are set 0, 2-3 set 1. Logits [3, 2, 1, 0] for every
    token and a bias of +5 on set 1: a type-0 token still takes experts 0, 1 (softmax over its
    set: gates e^3 / (e^3 + e^2) = 0.7311, 0.2689); a type-1 token takes 3 (bias) then 2,
    with the same two probabilities of its set: e^1 / (e^1 + e^0) = 0.7311 for expert 2."""
    layer = pymoe.MoELayer(2, 3, 4, 2, capacity_factor=None, dtype=np.float64, backend="numpy",
                           normalize=False, modality_sets=2,
                           expert_bias=np.array([0.0, 0.0, 5.0, 5.0]))
    layer.params["w_router"][:] = [[3.0, 2.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    x = np.array([[1.0, 0.0], [1.0, 0.0]])
    layer.forward(x, token_types=np.array([0, 1]))
    r = layer.routing
    assert r.expert_index.tolist() == [[0, 1], [2, 3]]
    e = np.exp(1.0)
    np.testing.assert_allclose(r.gate, [[e / (e + 1), 1 / (e + 1)]] * 2, rtol=1e-14)
    layer.forward(x)  # token_types None: every token of type 0
    assert layer.routing.expert_index.tolist() == [[0, 1], [0, 1]]


def test_modality_sets_gradients():
    layer = pymoe.MoELayer(4, 5, 8, 2, capacity_factor=None, dtype=np.float64, seed=3,
                           backend="numpy", preset="ernie4.5", modality_sets=2,
                           expert_bias=np.array([0.3, -0.2, 0.1, 0.0, 2.0, 2.0, 2.0, 2.0]))
    randomize(layer, 1)
    rng = np.random.default_rng(0)
    types = np.array([0, 1] * 5)
    forward = layer.forward
    layer.forward = lambda x, train=False: forward(x, train=train, token_types=types)
    errors = check_layer_gradients(layer, rng.standard_normal((10, 4)),
                                   rng.standard_normal((10, 4)))
    assert max(errors.values()) < FD_RTOL, errors


T, D, H, E = 10, 4, 5, 4
GRADIENT_CASES = {
    "bias_on_logits": dict(score="sigmoid", expert_bias_on="logits",
                           expert_bias=np.array([0.5, -0.5, 1.0, 0.0])),
    "groups_zero_fill": dict(score="sigmoid", num_groups=2, topk_groups=1, group_fill=0.0,
                             expert_bias=np.array([0.1, -0.9, -0.8, 0.0])),
    "l2_norm": dict(normalize=True, normalize_p=2.0),
    "l3_norm_sigmoid_aux": dict(score="sigmoid", normalize=True, normalize_p=3.0,
                                aux_loss_coef=0.1),
    "norm_eps": dict(score="sigmoid", normalize=True, normalize_eps=1e-2),
    "softcap": dict(score="sigmoid", normalize=True, router_softcap=2.0),
    "gemma4": dict(preset="gemma4", activation="geglu"),
}


@pytest.mark.parametrize("name", sorted(GRADIENT_CASES))
def test_gradients_match_finite_differences(name):
    kw = dict(GRADIENT_CASES[name])
    layer = pymoe.MoELayer(D, H, E, 2, capacity_factor=None, dtype=np.float64, seed=3,
                           backend="numpy", **kw)
    randomize(layer, 1)
    rng = np.random.default_rng(0)
    errors = check_layer_gradients(layer, rng.standard_normal((T, D)),
                                   rng.standard_normal((T, D)))
    assert max(errors.values()) < FD_RTOL, errors


def test_jitter_experts_gradients():
    layer = pymoe.MoELayer(D, H, E, 2, capacity_factor=None, dtype=np.float64, seed=3,
                           backend="numpy", jitter_eps=0.1, jitter_experts=True,
                           num_shared_experts=1)
    randomize(layer, 1)
    rng = np.random.default_rng(0)

    def same_noise():
        layer._noise_rng = np.random.default_rng(5)
    errors = check_layer_gradients(layer, rng.standard_normal((T, D)),
                                   rng.standard_normal((T, D)), train=True, reset_noise=same_noise)
    assert max(errors.values()) < FD_RTOL, errors


@pytest.mark.parametrize("kw,match", [
    (dict(expert_bias_on="bias"), "expert_bias_on"),
    (dict(group_fill=0.0), "group_fill: only used with num_groups"),
    (dict(group_fill=float("nan"), num_groups=2, topk_groups=1), "group_fill"),
    (dict(normalize_p=2.0), "normalize_p: only used with normalize=True"),
    (dict(normalize=True, normalize_p=0.0), "normalize_p"),
    (dict(normalize=True, normalize_eps=-1.0), "normalize_eps"),
])
def test_bad_route_keywords_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        pymoe.route(np.zeros((2, 4)), 2, None, **kw)


@pytest.mark.parametrize("kw,match", [
    (dict(router_softcap=-1.0), "router_softcap"),
    (dict(router_softcap=1.0, router_dtype="bfloat16"), "router_softcap"),
    (dict(router_softcap=1.0, router_noise="noisy_topk"), "router_softcap"),
    (dict(jitter_experts=True), "jitter_experts: needs router_noise='jitter'"),
    (dict(router_input_norm=True, jitter_eps=0.1), "router_input_norm"),
    (dict(gate_scale=True, formulation="dense"), "gate_scale"),
    (dict(gate_scale=True, token_groups=2), "gate_scale"),
    (dict(input_norm_eps=0.0), "input_norm_eps"),
    (dict(modality_sets=3), "modality_sets"),
    (dict(modality_sets=4), "modality_sets"),  # K = 2 > E / M = 1
    (dict(modality_sets=2, selection="experts"), "modality_sets"),
    (dict(modality_sets=2, token_groups=2), "modality_sets"),
])
def test_bad_layer_keywords_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        pymoe.MoELayer(4, 3, 4, 2, **kw)


def test_token_types_without_sets_is_refused():
    with pytest.raises(ValueError, match="token_types: only with modality_sets"):
        pymoe.MoELayer(4, 3, 4, 2).forward(np.zeros((2, 4)), token_types=np.array([0, 0]))
