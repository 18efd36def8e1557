"""Latent MoE (latent_dim, latent_norm), the post-expert norm (expert_post_norm) and the router
logit multiplier (logit_multiplier): pymoe.variants.latent, MuseSpark and NemotronH."""
from __future__ import annotations

import numpy as np
import pytest

import pymoe
from helpers import c_layer_agrees_with_numpy, check_layer_gradients, randomize


def test_by_hand():
    """D = Dm = 2, one relu expert with w1 = w2 = I, w_latent_in = I, w_latent_out = [[0, 1],
    [1, 0]] (a swap), every norm weight 0, eps ~ 0. x = [3, 4]: the latent norm gives
    [3, 4] / sqrt(12.5) = sqrt(2) [0.6, 0.8], whose rms is 1, so the post-expert norm keeps it;
    the only gate is 1 and the swap gives y = sqrt(2) [0.8, 0.6]."""
    layer = pymoe.MoELayer(2, 2, 1, 1, None, dtype=np.float64, latent_dim=2, latent_norm=True,
                           latent_norm_eps=1e-300, expert_post_norm=True,
                           expert_post_norm_eps=1e-300)  # one softmax expert: gate 1
    p = layer.params
    for name in ("w1", "w2"):
        p[name][0] = np.eye(2)
    p["w_latent_in"][...] = np.eye(2)
    p["w_latent_out"][...] = [[0.0, 1.0], [1.0, 0.0]]
    y = layer.forward(np.array([[3.0, 4.0]]))
    np.testing.assert_allclose(y, [np.sqrt(2) * np.array([0.8, 0.6])], rtol=1e-15)


def test_logit_multiplier_by_hand():
    """logits [3, -1] times 0.5 are the routing's logits [1.5, -0.5] (exact in binary)."""
    layer = pymoe.MoELayer(2, 2, 2, 1, None, dtype=np.float64, logit_multiplier=0.5)
    layer.params["w_router"][...] = [[1.0, 1.0], [1.0, -1.0]]
    layer.forward(np.array([[1.0, 2.0]]))
    np.testing.assert_array_equal(layer.routing.router_logits, [[1.5, -0.5]])


def _latent_layer(**kw):
    return pymoe.MoELayer(5, 4, 6, 2, 1.0, dtype=np.float64, score="sigmoid", normalize=True,
                          logit_multiplier=0.3, latent_dim=3, latent_norm=True,
                          expert_post_norm=True, activation="swiglu", num_shared_experts=1,
                          seed=1, **kw)


@pytest.mark.parametrize("formulation", ["indexed", "dense"])
def test_gradients_match_finite_differences(formulation):
    layer = _latent_layer(formulation=formulation, backend="numpy")
    randomize(layer, 3)  # norm weights too; capacity 1.0 drops some tokens
    rng = np.random.default_rng(0)
    errors = check_layer_gradients(layer, rng.standard_normal((9, 5)),
                                   rng.standard_normal((9, 5)))
    assert max(errors.values()) < 1e-6, errors


def test_c_backend_matches_numpy():
    """The C backend moves the latent tokens as any others: dispatch/combine are bitwise (y the
    same bits); the C gate gradient sums its dot product in another order, so dx and the
    gradients agree to round-off (1e-12, helpers' DOWNSTREAM_RTOL for float64)."""
    if pymoe.get_backend("auto").name != "c":
        pytest.skip("the C core is not built")

    def make(backend):
        layer = _latent_layer(backend=backend)
        randomize(layer, 3)
        return layer
    c_layer_agrees_with_numpy(make)


def test_post_norm_alone_in_the_model_width():
    layer = pymoe.MoELayer(4, 3, 4, 2, None, dtype=np.float64, expert_post_norm=True, seed=2)
    assert layer.params["expert_post_norm_weight"].shape == (4,)
    randomize(layer, 1)
    rng = np.random.default_rng(1)
    errors = check_layer_gradients(layer, rng.standard_normal((6, 4)),
                                   rng.standard_normal((6, 4)))
    assert max(errors.values()) < 1e-6, errors


def test_refusals_name_the_keyword():
    with pytest.raises(ValueError, match="latent_norm: needs latent_dim"):
        pymoe.MoELayer(4, 3, 4, 2, latent_norm=True)
    with pytest.raises(ValueError, match="gate_input: not supported with latent_dim"):
        pymoe.MoELayer(4, 3, 4, 2, latent_dim=2, gate_input=True)
    with pytest.raises(ValueError, match="latent_dim: not supported with token groups"):
        pymoe.MoELayer(4, 3, 4, 2, latent_dim=2, token_groups=2)
    with pytest.raises(ValueError, match="logit_multiplier"):
        pymoe.MoELayer(4, 3, 4, 2, logit_multiplier=-1.0)
    with pytest.raises(ValueError, match="latent_dim"):
        pymoe.MoELayer(4, 3, 4, 2, latent_dim=0)
