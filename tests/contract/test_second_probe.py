"""Regression tests of the second bad-input probe (issue 27): one section per item, each a case
that gave a silent wrong result or a confusing error before. The MPI items are in
tests/parallel/test_expert_parallel.py; the CLIs' in tests/tools/."""
from __future__ import annotations

import numpy as np
import pytest

import pymoe
from helpers import numerical_grad

# ------------------------------------------------ 5: float64 bias with float32 logits


def test_float64_bias_with_float32_logits_chooses_the_same_experts_on_every_backend():
    """The bias is cast to the score dtype before it is added, in every backend: 0.25 + 1e-9 is
    0.25 in float32, a tie, so expert 0 (the lowest index) wins everywhere."""
    logits, bias = np.zeros((4, 4), np.float32), np.array([0, 1e-9, 0, 0])
    got = {b: pymoe.route(logits, 1, None, expert_bias=bias, backend=b).expert_index.ravel()
           for b in ("numpy", "c") if pymoe.backends()[b].available}
    for b, idx in got.items():
        assert idx.tolist() == [0, 0, 0, 0], (b, idx)


@pytest.mark.parametrize("bias_dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("logit_dtype", [np.float32, np.float64])
def test_bias_dtype_mixes_agree_between_c_and_numpy(bias_dtype, logit_dtype):
    if not pymoe.backends()["c"].available:
        pytest.skip("the C backend is not built")
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 8)).astype(logit_dtype)
    bias = (rng.normal(size=8) * 1e-3).astype(bias_dtype)
    ref = pymoe.route(logits, 2, 1.0, expert_bias=bias, backend="numpy")
    c = pymoe.route(logits, 2, 1.0, expert_bias=bias, backend="c")
    assert np.array_equal(ref.expert_index, c.expert_index)
    assert np.array_equal(ref.position, c.position)


def test_c_top_k_takes_a_float16_bias_as_numpy_does():
    if not pymoe.backends()["c"].available:
        pytest.skip("the C backend is not built")
    score = np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32)
    bias = np.array([0, 0.5, 0, -0.5], np.float16)
    c, n = pymoe.get_backend("c").top_k(score, 2, bias), pymoe.get_backend("numpy").top_k(score, 2, bias)
    assert np.array_equal(c[0], n[0])

# ------------------------------------------------ 9: sigmoid scores that all underflow


@pytest.mark.filterwarnings("error")  # no NumPy warning either
def test_sigmoid_gates_of_underflowed_scores_are_the_exact_ratios():
    r = pymoe.route(np.full((2, 4), -800.0), 2, None, score="sigmoid", normalize=True)
    assert np.array_equal(r.gate, np.full((2, 2), 0.5))
    assert np.isfinite(r.aux_loss)
    # s_i / (s_0 + s_1) = 1 / (1 + e^-1) for logits -800, -801 (sigmoid(l) ~ e^l there)
    r = pymoe.route(np.array([[-800.0, -801.0, -900.0, -1000.0]]), 2, None, score="sigmoid",
                    normalize=True)
    want = 1 / (1 + np.exp(-1.0))
    np.testing.assert_allclose(r.gate, [[want, 1 - want]], rtol=1e-15)
    r32 = pymoe.route(np.array([[-200.0, -201.0, -300.0, -400.0]], np.float32), 2, None,
                      score="sigmoid", normalize=True)
    np.testing.assert_allclose(r32.gate, [[want, 1 - want]], rtol=1e-6)


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("normalize", [True, False])
def test_route_backward_of_underflowed_sigmoid_scores_is_finite_and_matches_differences(normalize):
    logits = np.array([[-800.0, -801.0, -800.5, -1000.0], [0.3, -0.2, 1.0, -2.0]])
    dgate = np.array([[1.0, 0.3], [0.5, -1.0]])

    def objective():
        r = pymoe.route(logits, 2, None, score="sigmoid", normalize=normalize)
        return float((r.gate * dgate).sum() + 0.1 * r.aux_loss)

    r = pymoe.route(logits, 2, None, score="sigmoid", normalize=normalize)
    d = pymoe.route_backward(r, dgate, 0.1)
    assert np.isfinite(d).all()
    np.testing.assert_allclose(d, numerical_grad(objective, logits, 1e-5), atol=1e-8)


def test_sigmoid_layer_with_very_negative_logits_trains_finitely():
    layer = pymoe.MoELayer(4, 5, 4, 2, None, score="sigmoid", normalize=True, dtype=np.float64,
                           backend="numpy")
    layer.params["b_router"] = np.full(4, -900.0)
    x = np.random.default_rng(0).normal(size=(6, 4))
    y = layer.forward(x)
    dx = layer.backward(np.ones_like(y))
    assert np.isfinite(y).all() and np.isfinite(dx).all()
    assert all(np.isfinite(g).all() for g in layer.grads.values())

# ------------------------------------------------ 10: update_expert_bias with a NaN or inf load


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_update_expert_bias_refuses_a_nonfinite_load(bad):
    with pytest.raises(ValueError, match=r"expert_load: expected finite values, got 1 NaN/inf"):
        pymoe.update_expert_bias(np.zeros(3), np.array([1.0, bad, 2.0]), 1e-3)


@pytest.mark.filterwarnings("error")
def test_softmax_gates_of_a_bias_chosen_underflowed_expert_are_finite():
    """Found by the extended fuzz: a large expert_bias makes a token choose experts whose
    softmax probabilities underflow to 0; normalised gates are then the softmax of the chosen
    logits (the exact ratio), not 0 / 0, and route_backward matches central differences."""
    logits = np.array([[800.0, 0.0, -1.0, 5.0]])
    bias = np.array([0.0, 1e6, 1e6, 0.0])
    dgate = np.array([[1.0, 0.25]])

    def objective():
        r = pymoe.route(logits, 2, None, normalize=True, expert_bias=bias)
        return float((r.gate * dgate).sum() + 0.1 * r.aux_loss)

    r = pymoe.route(logits, 2, None, normalize=True, expert_bias=bias)
    assert r.expert_index.tolist() == [[1, 2]]
    np.testing.assert_allclose(r.gate, [[1 / (1 + np.exp(-1.0)), 1 / (1 + np.e)]], rtol=1e-15)
    d = pymoe.route_backward(r, dgate, 0.1)
    assert np.isfinite(d).all()
    np.testing.assert_allclose(d, numerical_grad(objective, logits, 1e-5), atol=1e-8)


def test_a_bias_that_overflows_the_score_dtype_is_named():
    with pytest.raises(ValueError, match="expert_bias: a value overflows float32"):
        pymoe.route(np.zeros((2, 3), np.float32), 1, expert_bias=np.array([0, 1e300, 0]))


@pytest.mark.filterwarnings("error")
def test_route_backward_of_a_tiny_but_normal_chosen_probability_is_finite():
    """Found by the extended fuzz: p = e^-700 is a normal float64 but p^2 is not, and the
    ratio's backward divided by it (inf / NaN logit gradients)."""
    logits = np.array([[0.0, 700.0, 1.0]])
    r = pymoe.route(logits, 2, None, normalize=True, expert_bias=np.array([1e6, 0.0, 1e6]))
    assert r.expert_index.tolist() == [[0, 2]]  # the bias ties: the lower index first
    d = pymoe.route_backward(r, np.array([[0.0, 1.0]]), 0.0)
    assert np.isfinite(d).all()
    g = r.gate[0, 1]  # d/dl of g = e^1 / (e^0 + e^1): g (1 - g) at l_2, -g (1 - g) at l_0
    np.testing.assert_allclose(d[0, [2, 0]], [g * (1 - g), -g * (1 - g)], rtol=1e-6, atol=1e-9)
