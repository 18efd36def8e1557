"""SparseMixer (selection="sparsemixer", PhiMoE): literal picks and gates a reader can check by
hand, the eval gradient against central differences in float64, training's sampling (seedable,
the Heun factor) and the argument checks. HF's own sparsemixer: tests/hf/test_singles.py."""
from __future__ import annotations

import math

import numpy as np
import pytest

import pymoe
from helpers import FD_RTOL, check_layer_gradients, randomize
from pymoe.variants.sparsemixer import HEUN_THIRD


def test_sparsemixer_literal():
    """eps = 0.01, threshold 2 eps = 0.02 relative to the best remaining logit m.
    Row 0, logits (1, 0.99, 0.5, -1): pick 1: m = 1; 0.99 is within (0.01 / 1 <= 0.02), 0.5 is
    not (0.5): expert 0, gate softmax(1, 0.99)[0] = 1 / (1 + e^-0.01). Pick 2 (expert 0 gone):
    m = 0.99; 0.5 is out (0.49 / 0.99): expert 1 alone, gate 1.
    Row 1, logits (-1, -1.01, -3, -3): m = -1 and the factor max(|l|, m) = |l|: -1.01 is within
    (0.01 / 1.01), -3 is not (2 / 3): expert 0 with the same gate; then expert 1, gate 1."""
    L = np.array([[1.0, 0.99, 0.5, -1.0], [-1.0, -1.01, -3.0, -3.0]])
    r = pymoe.route(L, 2, preset="phimoe")
    assert r.expert_index.tolist() == [[0, 1], [0, 1]]
    g = 1 / (1 + math.exp(-0.01))
    np.testing.assert_allclose(r.gate, [[g, 1.0], [g, 1.0]], rtol=1e-14)
    # a wider threshold (eps 0.3: within 0.6 of m) lets 0.5 into pick 1 and 2 as well
    r = pymoe.route(L[:1], 2, preset="phimoe", sparsemixer_eps=0.3)
    p = np.exp([1.0, 0.99, 0.5]) / np.exp([1.0, 0.99, 0.5]).sum()
    q = np.exp([0.99, 0.5]) / np.exp([0.99, 0.5]).sum()  # pick 2: m = 0.99, 0.49 / 0.99 <= 0.6
    np.testing.assert_allclose(r.gate, [[p[0], q[0]]], rtol=1e-14)
    # replay: the eval gates of the given experts, each pick after the ones before it
    r = pymoe.route(L[:1], 2, preset="phimoe", sparsemixer_eps=0.3, replay=np.array([[1, 0]]))
    q = np.exp([1.0, 0.5]) / np.exp([1.0, 0.5]).sum()  # pick 2 without expert 1: m = 1
    np.testing.assert_allclose(r.gate, [[p[1], q[0]]], rtol=1e-14)


def test_sparsemixer_eval_layer_gradients():
    """The eval gates' derivative (the same formula HF's PhimoeMultiplier uses in training)
    against central differences, with the aux loss, in float64."""
    layer = pymoe.MoELayer(6, 5, 8, 2, preset="phimoe", sparsemixer_eps=0.3, dtype=np.float64,
                           backend="numpy", aux_loss_coef=0.1, z_loss_coef=0.01)
    randomize(layer, 0)
    layer.params["w_router"] /= 4  # logits close together: several candidates per pick
    rng = np.random.default_rng(1)
    x, dy = rng.standard_normal((9, 6)), rng.standard_normal((9, 6))
    layer.forward(x)
    assert (layer.routing.gate < 0.99).sum() > 5  # not every pick alone among its candidates
    errors = check_layer_gradients(layer, x, dy)
    assert max(errors.values()) < FD_RTOL, errors


def test_sparsemixer_training_is_seedable_and_heun_scaled():
    L = np.random.default_rng(0).standard_normal((200, 8))
    a = pymoe.route(L, 2, preset="phimoe", sparsemixer_eps=0.5, sparsemixer_sampling=True,
                    seed=3)
    b = pymoe.route(L, 2, preset="phimoe", sparsemixer_eps=0.5, sparsemixer_sampling=True,
                    seed=3)
    ev = pymoe.route(L, 2, preset="phimoe", sparsemixer_eps=0.5)
    np.testing.assert_array_equal(a.expert_index, b.expert_index)
    np.testing.assert_array_equal(a.gate, b.gate)
    off = a.expert_index[:, 0] != ev.expert_index[:, 0]  # the draw took a non-best candidate
    assert off.sum() > 10
    again = pymoe.route(L, 2, preset="phimoe", sparsemixer_eps=0.5, replay=a.expert_index)
    ratio = a.gate / again.gate  # the Heun factor: 1, or 0.3333 for some non-best picks
    assert set(np.round(ratio, 12).ravel()) == {1.0, round(HEUN_THIRD, 12)}
    assert (ratio[:, 0][~off] == 1).all()  # the best pick always keeps factor 1
    layer = pymoe.MoELayer(4, 3, 8, 2, preset="phimoe", sparsemixer_eps=0.5, seed=5)
    x = np.random.default_rng(2).standard_normal((50, 4)).astype(np.float32)
    y_eval = layer.forward(x)
    y1 = layer.forward(x, train=True)
    assert not np.allclose(y1, y_eval)
    assert layer.routing.options.sparsemixer_sampling
    twin = pymoe.MoELayer(4, 3, 8, 2, preset="phimoe", sparsemixer_eps=0.5, seed=5)
    np.testing.assert_array_equal(twin.forward(x, train=True), y1)  # the seed fixes the draws


def test_sparsemixer_arguments_are_checked():
    L = np.zeros((3, 4))
    with pytest.raises(ValueError, match="sparsemixer_eps: only read with"):
        pymoe.route(L, 2, sparsemixer_eps=0.1)
    with pytest.raises(ValueError, match="normalize: selection='sparsemixer'"):
        pymoe.route(L, 2, preset="phimoe", normalize=True)
    with pytest.raises(ValueError, match="score: selection='sparsemixer'"):
        pymoe.route(L, 2, preset="phimoe", score="sigmoid")
    with pytest.raises(ValueError, match="expert_bias: selection='sparsemixer'"):
        pymoe.route(L, 2, preset="phimoe", expert_bias=np.zeros(4))
    with pytest.raises(ValueError, match="seed"):
        pymoe.route(L, 2, preset="phimoe", sparsemixer_sampling=True)
    with pytest.raises(ValueError, match="sparsemixer_eps: expected"):
        pymoe.route(L, 2, preset="phimoe", sparsemixer_eps=-0.1)
    with pytest.raises(ValueError, match="sparsemixer_sampling: MoELayer samples"):
        pymoe.MoELayer(4, 3, 4, 2, preset="phimoe", sparsemixer_sampling=True)
    with pytest.raises(ValueError, match="do not support SparseMixer"):
        pymoe.MoELayer(4, 3, 4, 2, preset="phimoe", token_groups=2)
