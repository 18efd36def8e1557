"""Product-key routing (MoELayer(product_keys=...), Doge): literal logits a reader can check by
hand, both layouts, gradients against central differences in float64 and the argument checks.
HF's DogeCDMoE itself: tests/hf/test_blocks.py (family doge) and tests/hf/test_singles.py."""
from __future__ import annotations

import numpy as np
import pytest

import pymoe
from helpers import FD_RTOL, check_layer_gradients, randomize
from pymoe.variants.product_keys import product_key_logits, product_key_logits_backward


def test_product_key_logits_literal():
    """n = 2 keys per half, E = 4: expert i n + j gets a_i + b_j. Token keys (a | b) =
    (1, 0 | 0, 2): logits (1 + 0, 1 + 2, 0 + 0, 0 + 2) = (1, 3, 0, 2); top-2: experts 1 and 3,
    gates softmax(3, 2) = (1 / (1 + e^-1), 1 / (1 + e))."""
    keys = np.array([[1.0, 0.0, 0.0, 2.0]])
    L = product_key_logits(keys, "per_token")
    assert L.tolist() == [[1.0, 3.0, 0.0, 2.0]]
    r = pymoe.route(L, 2, preset="doge")
    assert r.expert_index.tolist() == [[1, 3]]
    np.testing.assert_allclose(r.gate, [[1 / (1 + np.e ** -1), 1 / (1 + np.e)]], rtol=1e-14)


def test_doge_layout_reads_the_logits_in_memory_order():
    """HF's view(2, T, n) of [T, 2n] = [[1, 2, 3, 4], [5, 6, 7, 8]] (T = 2, n = 2): half a is
    the first T n values, (1, 2) for token 0 and (3, 4) for token 1, half b the rest, (5, 6) and
    (7, 8): token 0's experts depend on token 1's logits."""
    keys = np.arange(1.0, 9.0).reshape(2, 4)
    L = product_key_logits(keys, "doge")
    assert L.tolist() == [[6, 7, 7, 8], [10, 11, 11, 12]]  # (1+5, 1+6, 2+5, 2+6), (3+7, ...)
    # the backward is the view's adjoint: <L(k), dL> = <k, L^T(dL)> for both layouts
    rng = np.random.default_rng(0)
    for layout in ("per_token", "doge"):
        k, dL = rng.standard_normal((5, 6)), rng.standard_normal((5, 9))
        lhs = float((product_key_logits(k, layout) * dL).sum())
        rhs = float((k * product_key_logits_backward(dL, layout)).sum())
        assert lhs == pytest.approx(rhs, rel=1e-12)


@pytest.mark.parametrize("layout", ["per_token", "doge"])
def test_product_key_layer_gradients(layout):
    """A Doge layer (product keys, single-neuron silu experts, a SwiGLU MLP beside them) with
    its Switch aux loss and the z-loss: every gradient against central differences, float64."""
    layer = pymoe.MoELayer(6, 1, 9, 2, preset="doge", product_keys=layout, shared_d_hidden=4,
                           dtype=np.float64, backend="numpy", aux_loss_coef=0.1,
                           z_loss_coef=0.01)
    assert layer.params["w_router"].shape == (6, 6) and layer.params["w1"].shape == (9, 6, 1)
    assert layer.params["shared_w1"].shape == (1, 6, 8)  # gated: [gate | up]
    randomize(layer, 0)
    rng = np.random.default_rng(1)
    x, dy = rng.standard_normal((7, 6)), rng.standard_normal((7, 6))
    errors = check_layer_gradients(layer, x, dy)
    assert max(errors.values()) < FD_RTOL, errors


def test_product_key_arguments_are_checked():
    with pytest.raises(ValueError, match="product_keys: needs a square number of experts"):
        pymoe.MoELayer(4, 1, 8, 2, product_keys="per_token")
    with pytest.raises(ValueError, match="product_keys: expected one of"):
        pymoe.MoELayer(4, 1, 9, 2, product_keys="rows")
    with pytest.raises(ValueError, match="product_keys: not supported with router_noise"):
        pymoe.MoELayer(4, 1, 9, 2, product_keys="per_token", router_noise="noisy_topk")
    with pytest.raises(ValueError, match="shared_activation: needs num_shared_experts"):
        pymoe.MoELayer(4, 1, 9, 2, shared_activation="swiglu")
    with pytest.raises(ValueError, match="shared_activation: 'swiglu_clamped' takes arguments"):
        pymoe.MoELayer(4, 1, 9, 2, num_shared_experts=1, shared_activation="swiglu_clamped")
