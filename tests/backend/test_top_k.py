"""Top-K selection in C (pymoe_top_k) against the NumPy reference, and route(backend=...)."""
import numpy as np
import pytest

import pymoe
from props import given, st
from pymoe.backend import NumpyBackend

REF = NumpyBackend()


@st.composite
def scores(draw):
    """[T, E] scores with optional bias and probs; often many ties and signed zeros."""
    T = draw(st.integers(0, 40))
    E = draw(st.sampled_from([1, 2, 3, 5, 8, 9, 16, 33, 64, 70, 130]))
    K = draw(st.integers(1, E))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    kind = draw(st.sampled_from(["normal", "rounded", "zeros", "few"]))
    s = rng.normal(size=(T, E))
    if kind == "rounded":
        s = np.round(s)
    elif kind == "zeros":  # every expert ties; half of them -0.0
        s = np.where(rng.random((T, E)) < 0.5, -0.0, 0.0)
    elif kind == "few":
        s = rng.integers(-2, 3, size=(T, E)) * 0.5
    bias = None
    if draw(st.booleans()):
        bias = np.round(rng.normal(size=E), 1).astype(dtype)
    probs = rng.random((T, E)).astype(dtype)
    return s.astype(dtype), K, bias, probs


@given(scores())
def test_top_k_is_the_reference_bit_for_bit(c_backend, case):
    s, K, bias, probs = case
    got = c_backend.top_k(s, K, bias, probs)
    want = REF.top_k(s, K, bias, probs)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.tobytes() == w.tobytes()


def test_large_k_takes_the_sorting_path(c_backend, rng):
    # more than 64 candidates (TOPK_RANK_MAX) per token: the merge sort path
    s = np.round(rng.normal(size=(50, 300)), 1)
    for K in (1, 65, 200, 300):
        assert np.array_equal(c_backend.top_k(s, K)[0], REF.top_k(s, K)[0])


def test_one_and_two_threads_give_identical_bits(c_backend, rng):
    if not c_backend.openmp:
        pytest.skip("built without OpenMP: there is only one thread")
    s = rng.normal(size=(3001, 64)).astype(np.float32)
    probs = pymoe.router.softmax(s)
    with c_backend.num_threads(1):
        one = c_backend.top_k(s, 8, probs=probs)
    with c_backend.num_threads(2):
        two = c_backend.top_k(s, 8, probs=probs)
    for a, b in zip(one, two):
        assert a.tobytes() == b.tobytes()


def test_bad_arguments_are_named(c_backend):
    s = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match="k"):
        c_backend.top_k(s, 4)
    with pytest.raises(ValueError, match="score: expected finite"):
        c_backend.top_k(np.full((2, 3), np.nan, np.float32), 1)
    with pytest.raises(ValueError, match="bias: expected shape"):
        c_backend.top_k(s, 1, bias=np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="bias: expected finite"):
        c_backend.top_k(s, 1, bias=np.array([0, np.inf, 0], np.float32))
    with pytest.raises(ValueError, match="probs: expected shape"):
        c_backend.top_k(s, 1, probs=np.zeros((3, 3), np.float32))
    with pytest.raises(TypeError, match="float16"):
        c_backend.top_k(s.astype(np.float16), 1)


def test_raw_entry_rejects_nan_and_bad_sizes(c_backend):
    ffi, lib = c_backend.ffi, c_backend.lib
    idx = ffi.new("int64_t[]", 8)
    s = ffi.new("float[]", [0.0, float("nan"), 1.0, 2.0])
    assert lib.pymoe_top_k_f32(idx, ffi.NULL, ffi.NULL, s, ffi.NULL, ffi.NULL, 2, 1, 2) == -8
    ok = ffi.new("float[]", [0.0, 3.0, 1.0, 2.0])
    assert lib.pymoe_top_k_f32(idx, ffi.NULL, ffi.NULL, ok, ffi.NULL, ffi.NULL, 2, 1, 2) == 0
    assert list(idx[0:2]) == [1, 1]
    nan_bias = ffi.new("float[]", [0.0, float("nan")])
    assert lib.pymoe_top_k_f32(idx, ffi.NULL, ffi.NULL, ok, nan_bias, ffi.NULL, 2, 1, 2) == -8
    assert lib.pymoe_top_k_f32(idx, ffi.NULL, ffi.NULL, ok, ffi.NULL, ffi.NULL, 2, 3, 2) == -1
    assert lib.pymoe_top_k_f32(idx, ffi.NULL, ffi.NULL, ok, ffi.NULL, ffi.NULL, -1, 1, 2) == -1
    assert lib.pymoe_top_k_f32(idx, ffi.NULL, ffi.NULL, ok, ffi.NULL, ffi.NULL, 2**62, 1, 4) == -1
    assert lib.pymoe_top_k_f32(ffi.NULL, ffi.NULL, ffi.NULL, ok, ffi.NULL, ffi.NULL, 2, 1, 2) == -2
    sums = ffi.new("float[]", 2)  # prob_sum asked for without probs
    assert lib.pymoe_top_k_f32(idx, ffi.NULL, sums, ok, ffi.NULL, ffi.NULL, 2, 1, 2) == -2
    assert lib.pymoe_top_k_f32(ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL,
                               0, 1, 2) == 0


@pytest.mark.parametrize("priority", ["choice", "score"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_route_c_is_route_numpy_bit_for_bit(c_backend, rng, priority, dtype):
    logits = np.round(rng.normal(size=(500, 16)), 1).astype(dtype)  # ties included
    a = pymoe.route(logits, 2, 0.9, priority=priority, backend="numpy")
    b = pymoe.route(logits, 2, 0.9, priority=priority, backend="c")
    for name in ("probs", "expert_index", "token_order", "position", "gate", "kept",
                 "expert_load", "slot_owner"):
        assert getattr(a, name).tobytes() == getattr(b, name).tobytes(), name
    assert (a.capacity, a.aux_loss, a.z_loss) == (b.capacity, b.aux_loss, b.z_loss)


def test_route_backend_is_checked():
    logits = np.zeros((4, 3))
    with pytest.raises(ValueError, match="backend"):
        pymoe.route(logits, 1, backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        pymoe.route(logits, 1, backend="fast")
    assert pymoe.route(logits, 1, backend="auto").expert_index.shape == (4, 1)
