"""The expert FFN's relu epilogues: the C twins (one pass) give experts.py's bits, and the layer's
relu path, which keeps no pre-activation, is still the dense formulation's gradient."""
import numpy as np
import pytest

import pymoe
from props import given, st
from pymoe.backend import NumpyBackend
from pymoe.experts import bias_relu, experts_backward, experts_forward, relu_backward

REF = NumpyBackend()


@st.composite
def blocks(draw):
    """[rows, cols] blocks with zeros of both signs, NaN and inf among normal values."""
    rows, cols = draw(st.integers(0, 9)), draw(st.integers(1, 40))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    special = np.array([0.0, -0.0, np.nan, np.inf, -np.inf, 1e-45])
    def pick(shape):
        a = np.round(rng.normal(size=shape), 1)
        return np.where(rng.random(shape) < 0.2, rng.choice(special, size=shape), a).astype(dtype)
    return pick((rows, cols)), pick((cols,)), pick((rows, cols))


def same_bits(got: np.ndarray, want: np.ndarray) -> bool:
    """Equal bits, signed zeros included; a NaN's payload may differ (x86 keeps the first
    operand's, and the loops need not take the operands in the same order)."""
    nan = np.isnan(want)
    return bool((np.isnan(got) == nan).all()) and got[~nan].tobytes() == want[~nan].tobytes()


@given(blocks())
def test_c_epilogues_are_the_numpy_bits(c_backend, case):
    a, bias, grad = case
    with np.errstate(invalid="ignore"):
        want_a, got_a = a.copy(), a.copy()
        bias_relu(want_a, bias)
        c_backend.bias_relu(got_a, bias)
        assert same_bits(got_a, want_a)
        hidden = want_a
        want_g, got_g = grad.copy(), grad.copy()
        relu_backward(want_g, hidden)
        c_backend.relu_backward(got_g, hidden)
    assert same_bits(got_g, want_g)


@pytest.mark.parametrize("who", ["numpy", "c"])
def test_epilogue_arguments_are_named(c_backend, who):
    be = REF if who == "numpy" else c_backend
    a, bias = np.zeros((3, 4)), np.zeros(4)
    with pytest.raises(ValueError, match="a: expected a C-contiguous, writeable"):
        be.bias_relu(np.zeros((4, 3)).T, bias)
    ro = a.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="a: expected a C-contiguous, writeable"):
        be.bias_relu(ro, bias)
    with pytest.raises(TypeError, match="a: expected a numpy array"):
        be.bias_relu([[1.0]], np.zeros(1))
    with pytest.raises(ValueError, match="bias"):
        be.bias_relu(a, np.zeros(3))
    with pytest.raises(ValueError, match="hidden"):
        be.relu_backward(a, np.zeros((3, 5)))
    with pytest.raises(ValueError, match="shares memory with hidden"):
        be.relu_backward(a, a)
    if who == "c":
        with pytest.raises(TypeError, match="a: the C backend takes float32 or float64"):
            be.bias_relu(a.astype(np.float16), bias)


def test_relu_experts_forward_backward_match_the_dense_path():
    """Filled rows with hidden-only relu (and any backend's epilogue) against the dense batched
    formulation, which keeps the pre-activation."""
    rng = np.random.default_rng(0)
    E, C, D, H = 3, 5, 4, 6
    x = rng.normal(size=(E, C, D))
    w1, b1 = rng.normal(size=(E, D, H)), rng.normal(size=(E, H))
    w2, b2 = rng.normal(size=(E, H, D)), rng.normal(size=(E, D))
    filled = np.array([5, 2, 0])
    x[np.arange(C)[None, :] >= filled[:, None]] = 0  # empty slots hold zeros, as dispatch leaves
    dout = rng.normal(size=(E, C, D)) * (np.arange(C)[None, :, None] < filled[:, None, None])
    dense_out, dense_cache = experts_forward(x, w1, b1, w2, b2, "relu")
    dense_din, dense_g = experts_backward(dout, w1, w2, dense_cache)
    for backend in (None, REF):
        out, cache = experts_forward(x, w1, b1, w2, b2, "relu", filled=filled, backend=backend)
        assert cache.pre is None
        din, g = experts_backward(dout, w1, w2, cache, backend=backend)
        rows = np.arange(C)[None, :] < filled[:, None]
        # the filled rows' matmuls have other shapes than the dense [C, D] ones, and OpenBLAS may
        # block them differently (last-bit differences measured on its SSE kernels): float64 sums
        # of D and H terms, so 1e-12 relative plus an absolute floor for outputs near zero
        np.testing.assert_allclose(out[rows], dense_out[rows], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(din[rows], dense_din[rows], rtol=1e-12, atol=1e-12)
        for name in g:
            np.testing.assert_allclose(g[name], dense_g[name], rtol=1e-12, atol=1e-12)


def test_relu_layer_gradients_match_finite_differences(c_backend):
    from helpers import FD_RTOL, check_layer_gradients, randomize
    for backend in ("numpy", "c"):
        layer = pymoe.MoELayer(4, 6, 4, 2, 0.6, activation="relu", aux_loss_coef=0.1,
                               backend=backend, dtype=np.float64, seed=0)
        randomize(layer, seed=3)
        rng = np.random.default_rng(7)
        x, dy = rng.normal(size=(12, 4)), rng.normal(size=(12, 4))
        errors = check_layer_gradients(layer, x, dy)
        assert max(errors.values()) <= FD_RTOL, (backend, errors)
