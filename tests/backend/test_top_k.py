"""Top-K selection in C (pymoe_top_k) and CUDA (pymoe_cuda_top_k, and the fused softmax + top-K of
the CUDA router) against the NumPy reference and each other, and route(backend=...)."""
import numpy as np
import pytest
from problems import problem, ref_routing

import pymoe
from helpers import GATE_RTOL, PROB_RTOL
from props import given, settings, st
from pymoe.backend import NumpyBackend
from pymoe.topk import top_k as np_top_k

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


# ------------------------------------------------------------------ CUDA (pymoe_cuda_top_k)
@settings(max_examples=30)
@given(st.integers(0, 40), st.integers(1, 70), st.integers(0, 2**31), st.booleans(),
       st.booleans(), st.sampled_from([np.float32, np.float64]),
       st.sampled_from([32, 64, 256, 1024]))
def test_top_k_matches_the_c_contract(cuda_impl, c_core, T, E, seed, ties, with_bias, dtype,
                                      block):
    """expert_index of score + bias (ties to the lower expert, as pymoe.topk.top_k), the counts
    per expert, and the column sums of probs bit for bit (token order, from 0), as C's
    pymoe_top_k computes them."""
    be, dev, host = cuda_impl.backend, cuda_impl.to_device, cuda_impl.to_host
    rng = np.random.default_rng(seed)
    K = int(rng.integers(1, min(E, 8) + 1))
    score = rng.normal(size=(T, E))
    if ties:
        score = np.round(score)
    score = score.astype(dtype)
    bias = rng.normal(size=E).astype(dtype) if with_bias else None
    probs = rng.uniform(size=(T, E)).astype(dtype)
    with be.block_size(block):
        index, load, psum = be.top_k(dev(score), K, None if bias is None else dev(bias),
                                     dev(probs))
    v = score if bias is None else score + bias  # rounded in the dtype, as the contract says
    want = np_top_k(v, K)
    np.testing.assert_array_equal(host(index), want)
    np.testing.assert_array_equal(host(load), np.bincount(want.reshape(-1), minlength=E))
    # in token order from 0: cumsum adds sequentially (probs.sum(axis=0) does too, except at
    # E = 1 where the axis is contiguous and NumPy sums pairwise)
    in_order = np.cumsum(probs, axis=0)[-1] if T else np.zeros(E, dtype)
    np.testing.assert_array_equal(host(psum), in_order)
    index2, load2, none = be.top_k(dev(score), K, None if bias is None else dev(bias))
    assert none is None
    np.testing.assert_array_equal(host(index2), want)
    for c in c_core:  # the C twin, pymoe_top_k: the same integers and bits
        c_index, c_load, c_sum = c.top_k(score, K, bias, probs)
        np.testing.assert_array_equal(host(index), c_index)
        np.testing.assert_array_equal(host(load), c_load)
        np.testing.assert_array_equal(host(psum), c_sum)


def test_top_k_treats_signed_zeros_as_equal(cuda_impl):
    be, dev, host = cuda_impl.backend, cuda_impl.to_device, cuda_impl.to_host
    score = np.array([[0.0, -0.0, 0.0, -1.0], [-0.0, 0.0, -0.0, 2.0]])
    index, _, _ = be.top_k(dev(score), 3)
    np.testing.assert_array_equal(host(index), [[0, 1, 2], [3, 0, 1]])


@pytest.mark.parametrize("E,block", [(300, 1024), (512, 64)])
def test_wide_rows_in_the_warp_router(cuda_impl, E, block):
    """E > 256: 16 values per lane (at most 512 threads per block there, which the host caps)."""
    be, dev, host = cuda_impl.backend, cuda_impl.to_device, cuda_impl.to_host
    rng = np.random.default_rng(E)
    logits = np.round(rng.normal(size=(5, E)), 1)
    with be.block_size(block):
        probs, index, _ = be.softmax_top_k(dev(logits), 8)
        index2, load, _ = be.top_k(dev(logits), 8)
    np.testing.assert_array_equal(host(index), np_top_k(logits, 8))
    np.testing.assert_array_equal(host(index2), np_top_k(logits, 8))
    np.testing.assert_allclose(host(probs).sum(axis=1), 1.0)
    with pytest.raises(ValueError, match="PYMOE_ERR_SIZE"):
        be.top_k(dev(np.zeros((2, 513))), 2)


# ------------------------------------------------ CUDA softmax + top-K (pymoe_cuda_softmax_top_k)
def check_softmax_top_k(cuda_impl, case, normalize):
    logits, K, _, _, _, block, _ = case
    be, dev, host = cuda_impl.backend, cuda_impl.to_device, cuda_impl.to_host
    r = ref_routing(logits, K, None, "choice", normalize)
    with be.block_size(block):
        probs, index, gate = be.softmax_top_k(dev(logits), K, normalize)
    np.testing.assert_array_equal(host(index), r.expert_index)  # ranks logits: exact
    tol = PROB_RTOL[logits.dtype]
    np.testing.assert_allclose(host(probs), r.probs, rtol=tol, atol=tol)
    np.testing.assert_allclose(host(gate), r.gate_before_drop, rtol=GATE_RTOL[logits.dtype],
                               atol=tol)


@settings(max_examples=40)
@given(problem(), st.booleans())
def test_softmax_top_k_matches_reference(cuda_impl, case, normalize):
    check_softmax_top_k(cuda_impl, case, normalize)


@settings(max_examples=4)
@given(problem(blocks=(512, 1024)), st.booleans())
def test_softmax_top_k_large_blocks(cuda_impl, case, normalize):
    check_softmax_top_k(cuda_impl, case, normalize)


def test_nan_scores_are_reported_on_the_device(cuda_impl):
    be, dev = cuda_impl.backend, cuda_impl.to_device
    with pytest.raises(ValueError, match="a score or bias entry is NaN"):
        be.top_k(dev(np.array([[0.0, np.nan, 1.0]])), 2)
    with pytest.raises(ValueError, match="a score or bias entry is NaN"):
        be.softmax_top_k(dev(np.array([[0.0, np.nan, 1.0]])), 2)


def test_softmax_top_k_wrapper_checks_kinds_and_sizes(cuda_impl):
    be, dev = cuda_impl.backend, cuda_impl.to_device
    with pytest.raises(TypeError, match="router_logits: expected dtype float32 or float64, got"):
        be.softmax_top_k(dev(np.zeros((2, 3), np.float16)), 1)
    with pytest.raises(ValueError, match=r"k: expected an int in \[1, 3\], got 4"):
        be.softmax_top_k(dev(np.zeros((2, 3))), 4)
